"""What training minimizes: the (class-weighted) loss, the distillation loss against a teacher,
and the rounding noise a circuit adds, simulated in training."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .model import QATFCNN


def class_weights(targets: np.ndarray, info) -> torch.Tensor | None:
    """Inverse-frequency weights (single-label) or positive weights (multi-label) of
    ``targets`` (:attr:`Split.targets`)."""
    y = targets
    if info.multi_label:
        pos = y.mean(axis=0).clip(1e-3, 1 - 1e-3)
        return torch.tensor((1 - pos) / pos, dtype=torch.float32)
    counts = np.bincount(y, minlength=info.n_outputs).astype(np.float64)
    w = len(y) / (len(counts) * np.maximum(counts, 1))
    return torch.tensor(w, dtype=torch.float32)


def loss_fn(targets: np.ndarray, info, weighted: bool) -> nn.Module:
    w = class_weights(targets, info) if weighted else None
    if info.multi_label:
        return nn.BCEWithLogitsLoss(pos_weight=w)
    return nn.CrossEntropyLoss(weight=w)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, multi_label: bool) -> torch.Tensor:
    """Soft-label loss: KL divergence at ``temperature`` (scaled by T**2, Hinton et al.), or BCE
    against the teacher's probabilities for multi-label tasks."""
    if multi_label:
        return nn.functional.binary_cross_entropy_with_logits(student, torch.sigmoid(teacher))
    t = temperature
    return nn.functional.kl_div(nn.functional.log_softmax(student / t, dim=1),
                                nn.functional.log_softmax(teacher / t, dim=1),
                                log_target=True, reduction="batchmean") * t * t


class RoundingNoise:
    """Training-time forward hooks on the hidden linear layers: add uniform noise of up to
    ``steps`` rounding steps to each pre-activation, where a step is the batch's pre-activation
    range divided by ``2**bits`` (what the circuit's rounding keeps). Hooks change neither the
    state dict nor the exported graph, and are removed on exit."""

    def __init__(self, model: QATFCNN, bits: int, steps: float):
        self.layers = model.linears()[:-1]
        self.scale, self.steps = 2.0 ** -bits, steps
        self.handles: list = []

    def _hook(self, module, _inputs, out):
        if not module.training:
            return out
        span = (out.detach().amax(dim=0) - out.detach().amin(dim=0)).max()
        return out + (torch.rand_like(out) * 2 - 1) * (self.steps * self.scale * span)

    def __enter__(self):
        if self.steps > 0:
            self.handles = [m.register_forward_hook(self._hook) for m in self.layers]
        return self

    def __exit__(self, *_exc):
        for h in self.handles:
            h.remove()
