"""Undo a sideways squeeze before an upload is cropped the way MedMNIST cropped.

Copies of X-rays are often resized to a square without keeping the aspect ratio (the 224 px
Kermany copies in ``../shared/data/real`` are), so the whole width of the scan is in the picture
and the anatomy is narrower than in MedMNIST's crop, which kept the central square. The model has
learned MedMNIST's framing, so such an upload gets a different answer.

The squeeze ``s`` of a square upload is the share of its width that MedMNIST's crop would have
kept (1: framed like MedMNIST; 0.7: the central 70% of the width). A small CNN estimates it from
the upload's central vertical band (:data:`BAND` of the width, full height). It is trained on the
dataset's **train split only**: each training image is a correctly framed crop, so the central
``BAND / s`` of its width is what a copy squeezed by ``s`` shows in its central band. Both the
synthetic bands and the uploads' bands are blurred alike (:data:`COMMON_BLUR`) so that the
sharpness of the source does not tell the squeeze.

When the estimate times :attr:`Framing.scale` is below :attr:`Framing.threshold`, the upload's
central ``s * scale`` of the width is kept and stretched back to a square (with a note). The
estimator is stored beside the model (``framing.npz``, about 0.6 MB for three nets) and runs in numpy: the
client imports no torch. It is fitted only for datasets whose uploads come squeezed
(:data:`SQUEEZED_DATASETS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

FRAMING_FILE = "framing.npz"
SQUEEZED_DATASETS = ("pneumoniamnist",)  # chest X-rays: copies squeezed to a square are common
BAND = 0.5  # central share of the upload's width the estimator sees
STRIP = (14, 28)  # (width, height) of the band the estimator reads
COMMON_BLUR = 1.0  # Gaussian blur (strip pixels) applied to every band, synthetic or uploaded
S_RANGE = (0.5, 1.3)  # squeezes the estimator is trained on
SCALE = 1.05  # the crop keeps s * SCALE of the width (chosen on ../shared/data/real and validation)
THRESHOLD = 0.95  # ... when s * SCALE is below this; otherwise the upload is left as it is
LAYERS = ("c1", "c2", "c3", "f1", "f2")


def strip(square: np.ndarray, share: float = BAND) -> np.ndarray:
    """The central ``share`` of a square grey image's width, full height, as a standardized
    (28, 14) float32 band."""
    h, w = square.shape[:2]
    half = share * w / 2
    im = Image.fromarray(np.asarray(square, dtype=np.uint8)).resize(
        STRIP, Image.Resampling.LANCZOS, box=(w / 2 - half, 0, w / 2 + half, h))
    return _standardize(np.asarray(im.filter(ImageFilter.GaussianBlur(COMMON_BLUR)), dtype=np.float32))


def grey(image: np.ndarray) -> np.ndarray:
    """A uint8 image as grey (H, W): colour is converted to luminance, as the upload path does."""
    image = np.asarray(image, dtype=np.uint8)
    return image if image.ndim == 2 else np.asarray(Image.fromarray(image).convert("L"))


def _standardize(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-3)


# -- numpy forward of the estimator (the client runs this; training uses the same layout in torch)
def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """3x3 'same' convolution; x (C, H, W), w (O, C, 3, 3)."""
    c, h, wd = x.shape
    p = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    cols = np.stack([p[:, i:i + h, j:j + wd] for i in range(3) for j in range(3)], axis=1)  # (C, 9, H, W)
    return np.einsum("ock,ckhw->ohw", w.reshape(w.shape[0], c, 9), cols) + b[:, None, None]


def _pool(x: np.ndarray) -> np.ndarray:
    c, h, w = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(c, h // 2, 2, w // 2, 2).max(axis=(2, 4))


def _forward(p: dict, band: np.ndarray) -> float:
    x = band[None]
    x = np.maximum(_conv(x, p["c1.w"], p["c1.b"]), 0)
    x = _pool(np.maximum(_conv(x, p["c2.w"], p["c2.b"]), 0))
    x = _pool(np.maximum(_conv(x, p["c3.w"], p["c3.b"]), 0))
    x = np.maximum(p["f1.w"] @ x.reshape(-1) + p["f1.b"], 0)
    return float((p["f2.w"] @ x + p["f2.b"])[0])


@dataclass
class Framing:
    nets: list[dict]  # each: layer name -> weight array (numpy)
    scale: float = SCALE
    threshold: float = THRESHOLD

    def estimate(self, square: np.ndarray) -> float:
        """The squeeze ``s`` of a square uint8 image (any size, grey or colour): the share of its
        width that MedMNIST's crop would keep (the nets' mean in log space)."""
        band = strip(grey(square))
        return float(np.exp(np.mean([_forward(p, band) for p in self.nets])))

    def reframe(self, square: np.ndarray) -> tuple[np.ndarray, float | None]:
        """(the image to resize, the share of the width kept or None when left as it is).
        ``square``: the upload's centre square, grey (H, W) or colour (H, W, 3) uint8."""
        keep = self.estimate(square) * self.scale
        if keep >= self.threshold:
            return square, None
        h, w = square.shape[:2]
        cw = max(1, int(round(keep * w)))
        left = (w - cw) // 2
        crop = Image.fromarray(np.ascontiguousarray(square[:, left:left + cw]))
        return np.asarray(crop.resize((w, h), Image.Resampling.LANCZOS)), keep

    # -- storage
    def save(self, folder: Path) -> Path:
        path = Path(folder) / FRAMING_FILE
        arrays = {f"n{i}.{k}": v for i, p in enumerate(self.nets) for k, v in p.items()}
        np.savez_compressed(path, scalars=np.array([self.scale, self.threshold, len(self.nets)]), **arrays)
        return path

    @classmethod
    def load(cls, folder: Path) -> "Framing | None":
        path = Path(folder) / FRAMING_FILE
        if not path.exists():
            return None
        with np.load(path) as f:
            scale, threshold, n = f["scalars"]
            nets = [{k.split(".", 1)[1]: f[k] for k in f.files if k.startswith(f"n{i}.")} for i in range(int(n))]
        return cls(nets, float(scale), float(threshold))


# -- fitting (torch, from the train split only)
def synthetic_bands(images: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` bands as uploads squeezed by a random ``s`` would show them, made from correctly framed
    grey images (uint8, N x H x W); (bands (n, 28, 14) float32, log s)."""
    lo, hi = np.log(S_RANGE[0]), np.log(S_RANGE[1])
    logs = rng.uniform(lo, hi, n).astype(np.float32)
    out = np.empty((n, STRIP[1], STRIP[0]), dtype=np.float32)
    for k in range(n):
        im = images[rng.integers(len(images))]
        h, w = im.shape
        half = min(1.0, BAND / np.exp(logs[k])) * w / 2
        pic = Image.fromarray(im).resize(STRIP, Image.Resampling.LANCZOS, box=(w / 2 - half, 0, w / 2 + half, h))
        if rng.random() < 0.5:
            pic = pic.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        r = rng.uniform(0, 0.8)
        if r > 0.05:
            pic = pic.filter(ImageFilter.GaussianBlur(r))
        x = np.asarray(pic, dtype=np.float32) / 255.0
        x = 255.0 * np.clip(x, 0, 1) ** rng.uniform(0.7, 1.4)
        x = np.clip(x + rng.normal(0, rng.uniform(0, 4), x.shape), 0, 255).astype(np.uint8)
        pic = Image.fromarray(x).filter(ImageFilter.GaussianBlur(COMMON_BLUR))
        out[k] = _standardize(np.asarray(pic, dtype=np.float32))
    return out, logs


def fit(train_images: np.ndarray, seeds: tuple[int, ...] = (0, 1, 2), epochs: int = 14, per_epoch: int = 20000,
        progress=None) -> Framing:
    """Train the squeeze estimators (one per seed) on the train split's grey images."""
    import torch
    from torch import nn

    images = np.asarray(train_images)
    images = images if images.ndim == 3 else np.stack([grey(x) for x in images])
    nets = []
    for si, seed in enumerate(seeds):
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                            nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Flatten(), nn.Linear(32 * (STRIP[1] // 4) * (STRIP[0] // 4), 64), nn.ReLU(),
                            nn.Linear(64, 1))
        opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
        for epoch in range(epochs):
            bands, logs = synthetic_bands(images, per_epoch, rng)
            x, y = torch.from_numpy(bands[:, None]), torch.from_numpy(logs)
            perm = torch.randperm(len(x))
            net.train()
            for i in range(0, len(x), 128):
                idx = perm[i:i + 128]
                loss = nn.functional.smooth_l1_loss(net(x[idx]).squeeze(1), y[idx], beta=0.05)
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
            if progress is not None:
                progress((si * epochs + epoch + 1) / (len(seeds) * epochs))
        layers = [m for m in net if isinstance(m, (nn.Conv2d, nn.Linear))]
        nets.append({f"{name}.{kind}": getattr(m, attr).detach().numpy().copy()
                     for name, m in zip(LAYERS, layers) for kind, attr in (("w", "weight"), ("b", "bias"))})
    return Framing(nets)


def inherit(saved, models_dir=None) -> Path | None:
    """Copy the newest estimator among the dataset's other saved models beside ``saved`` (it does not
    depend on the classifier, only on the dataset's framing); the copied file's source, or None."""
    import shutil

    from .registry import list_models

    if (saved.path / FRAMING_FILE).exists():
        return saved.path / FRAMING_FILE
    others = [m for m in list_models(saved.dataset, models_dir) if m.path != saved.path and (m.path / FRAMING_FILE).exists()]
    if not others:
        return None
    source = max(others, key=lambda m: (m.path / FRAMING_FILE).stat().st_mtime).path / FRAMING_FILE
    shutil.copyfile(source, saved.path / FRAMING_FILE)
    return source


def fit_for(saved, data_cfg=None, progress=None) -> Framing:
    """Fit and store the squeeze estimator of a saved model from its dataset's train split."""
    from .data import load_split

    cfg = data_cfg or saved.config.data
    framing = fit(load_split(cfg, "train").images, progress=progress)
    framing.save(saved.path)
    return framing
