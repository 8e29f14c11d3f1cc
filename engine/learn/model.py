"""Brevitas quantization-aware fully connected network.

``quant_input -> [QuantLinear -> QuantReLU] * len(hidden) -> QuantLinear``. Every hidden neuron
becomes one programmable bootstrap (table lookup) in the TFHE circuit; the input quantizer and
the output dequantization run in the clear on the client.
"""

from __future__ import annotations

import torch
from brevitas import nn as qnn
from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerTensorFloat
from torch import nn
from torch.nn.utils import prune

from ..config import ModelConfig


class QATFCNN(nn.Module):
    def __init__(self, in_features: int, n_outputs: int, cfg: ModelConfig):
        super().__init__()
        if any(h < 1 for h in cfg.hidden):
            raise ValueError(f"hidden widths must be positive, got {cfg.hidden}")
        for name in ("weight_bits", "act_bits", "input_bits"):
            if not 2 <= getattr(cfg, name) <= 16:
                raise ValueError(f"{name} must be between 2 and 16, got {getattr(cfg, name)}")
        self.cfg = cfg
        self.quant_input = qnn.QuantIdentity(
            bit_width=cfg.input_bits, act_quant=Int8ActPerTensorFloat, return_quant_tensor=True
        )
        layers: list[nn.Module] = []
        width = in_features
        for h in cfg.hidden:
            layers += [self._linear(width, h), qnn.QuantReLU(bit_width=cfg.act_bits, return_quant_tensor=True)]
            width = h
        layers.append(self._linear(width, n_outputs))
        self.layers = nn.Sequential(*layers)

    def _linear(self, n_in: int, n_out: int) -> qnn.QuantLinear:
        return qnn.QuantLinear(
            n_in,
            n_out,
            bias=True,
            weight_bit_width=self.cfg.weight_bits,
            weight_quant=Int8WeightPerTensorFloat,
            narrow_range=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.quant_input(x))
        return out.value if hasattr(out, "value") else out

    @torch.no_grad()
    def accumulator_bits(self, x: torch.Tensor) -> int:
        """Signed bit-width of the widest integer accumulator (a layer's integer inputs times its
        integer weights, plus its bias in the same units) on inputs ``x``: what Concrete sizes the
        whole circuit by, before rounding. An estimate from Brevitas' own integers (per-tensor
        scales, zero points 0), so it can be checked before compiling."""
        was_training = self.training
        self.eval()
        h, widest = self.quant_input(x), 1
        for m in self.layers:
            if isinstance(m, qnn.QuantLinear):
                w = m.quant_weight()
                acc = h.int().double() @ w.int().double().T
                if m.bias is not None:
                    acc = acc + torch.round(m.bias.double() / (h.scale.double() * w.scale.double()))
                lo, hi = int(acc.min()), int(acc.max())
                widest = max(widest, max(hi, 0).bit_length() + 1, max(-lo - 1, 0).bit_length() + 1)
            h = m(h)
        self.train(was_training)
        return widest

    def linears(self) -> list[qnn.QuantLinear]:
        return [m for m in self.layers if isinstance(m, qnn.QuantLinear)]

    # -- pruning: bound the number of active inputs of each neuron (hence accumulator width)
    def apply_pruning(self, share: float = 1.0) -> None:
        """Keep the largest weights of each neuron (row-wise L1): ``share`` 1 keeps
        ``max_active_inputs``, a smaller share a step of a gradual schedule
        (``n - share * (n - max_active_inputs)`` of ``n`` inputs). Weights pruned at an earlier
        step stay pruned; the parameters stay the same objects (an optimizer keeps them)."""
        k = self.cfg.max_active_inputs
        if not k:
            return
        for layer in self.linears():
            n_in = layer.in_features
            if n_in > k:
                keep = max(k, n_in - int(round(share * (n_in - k))))
                weight = layer.weight.detach().abs()
                if prune.is_pruned(layer):
                    prune.remove(layer, "weight")
                prune.custom_from_mask(layer, "weight", _row_topk_mask(weight, keep))

    def remove_pruning(self) -> None:
        for layer in self.linears():
            if prune.is_pruned(layer):
                prune.remove(layer, "weight")


def _row_topk_mask(w: torch.Tensor, k: int) -> torch.Tensor:
    idx = w.topk(k, dim=1).indices
    mask = torch.zeros_like(w)
    mask.scatter_(1, idx, 1.0)
    return mask


def build_model(in_features: int, n_outputs: int, cfg: ModelConfig) -> QATFCNN:
    return QATFCNN(in_features, n_outputs, cfg)
