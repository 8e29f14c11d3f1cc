"""A small clear CNN teacher for knowledge distillation.

The FCNN student sees pooled, 3-bit inputs and has a handful of neurons; a convolutional
teacher trained in float on the full images reaches higher accuracy, and its soft labels carry
more than the hard ones (how sure it is, which images look alike). The teacher never leaves the
training machine: only the student is compiled to FHE.

Teachers are cached on disk (``<cache>/teachers/<key>.pt``), keyed by the dataset and the
teacher's settings, so several students share one teacher.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..config import default_cache_dir


class TeacherCNN(nn.Module):
    def __init__(self, channels: int, n_outputs: int, width: int = 32):
        super().__init__()
        w = width

        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        self.net = nn.Sequential(
            *block(channels, w), *block(w, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(4 * w, n_outputs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def channels_of(images: np.ndarray) -> int:
    """1 for (N, H, W) images, C for (N, H, W, C)."""
    return 1 if images.ndim == 3 else images.shape[-1]


def image_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W[, C]) -> float32 (N, C, H, W) in [-1, 1]."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32) / 127.5 - 1.0)
    return x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)


@torch.no_grad()
def teacher_logits(model: nn.Module, images: np.ndarray, batch: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([model(image_tensor(images[i : i + batch])) for i in range(0, len(images), batch)])


def teacher_key(dataset: str, size: int, n_train: int, settings: dict) -> str:
    text = json.dumps({"dataset": dataset, "size": size, "n_train": n_train, **settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fit_teacher(train_images: np.ndarray, train_targets: np.ndarray, val_images: np.ndarray,
                val_score: Callable[[torch.Tensor], float], criterion: nn.Module, n_outputs: int,
                epochs: int, seed: int, augment: Callable[[np.ndarray], np.ndarray] | None,
                say: Callable[[str], None] = lambda _m: None) -> nn.Module:
    """Train the CNN (AdamW, one-cycle), keeping the epoch with the best validation score."""
    import copy

    torch.manual_seed(seed)
    model = TeacherCNN(channels_of(train_images), n_outputs)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    batch = 128
    steps = epochs * ((len(train_images) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=max(steps, 1))
    y = torch.from_numpy(train_targets)
    gen = torch.Generator().manual_seed(seed)
    best, best_state = -np.inf, None
    for epoch in range(1, epochs + 1):
        model.train()
        x = image_tensor(augment(train_images) if augment else train_images)
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(perm), batch):
            idx = perm[i : i + batch]
            loss = criterion(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        score = val_score(teacher_logits(model, val_images))
        say(f"teacher epoch {epoch}/{epochs}: validation {score:.4f}")
        if score > best:
            best, best_state = score, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    return model


def cached_teacher(key: str, build: Callable[[], nn.Module], channels: int, n_outputs: int,
                   cache_dir: Path | None = None) -> nn.Module:
    """The teacher stored under ``key``, else ``build()`` (stored for next time)."""
    path = Path(cache_dir or default_cache_dir()) / "teachers" / f"{key}.pt"
    if path.exists():
        try:
            model = TeacherCNN(channels, n_outputs)
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        except (OSError, RuntimeError, ValueError):
            path.unlink(missing_ok=True)
    model = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{np.random.randint(1 << 30)}")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model
