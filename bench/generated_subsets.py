"""Learnable MedMNIST-format files for the kinds of subset not on this machine, made from the two
real ones: RGB multi-class, multi-label and ordinal. For checking the generic recipe's defaults
(issue 20) where no dataset file of that kind can be downloaded; never for reporting accuracy
on those subsets.

    python bench/generated_subsets.py OUT_DIR      # writes bloodmnist.npz, chestmnist.npz, retinamnist.npz
    MEDMNIST_DIR=OUT_DIR python -m engine train --dataset bloodmnist --name defaults

- ``bloodmnist`` (RGB, 8 classes): PneumoniaMNIST's two classes and BreastMNIST's two, each in
  one of two colour tints chosen at random; the class is (source, label, tint).
- ``chestmnist`` (grayscale, 14 labels): PneumoniaMNIST images; label 0 is pneumonia, label 1
  "brighter than the median", label 2 "left half brighter than the right", the others never set.
- ``retinamnist`` (RGB, ordinal 5 levels): both sources in a random tint; the level is the
  quintile of the image's mean brightness.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from engine.config import shared_medmnist_dir

SPLITS = ("train", "val", "test")
TINTS = np.array([[1.0, 0.55, 0.6], [0.5, 0.75, 1.0]])  # reddish, bluish


def _load(folder: Path, flag: str) -> dict:
    with np.load(folder / f"{flag}.npz") as z:
        return {k: z[k] for k in z.files}


def _tint(images: np.ndarray, which: np.ndarray) -> np.ndarray:
    rgb = images[..., None].astype(np.float32) * TINTS[which][:, None, None, :]
    return rgb.clip(0, 255).astype(np.uint8)


def make(out: Path, source: Path, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    pneu, breast = _load(source, "pneumoniamnist"), _load(source, "breastmnist")
    blood, chest, retina = {}, {}, {}
    for split in SPLITS:
        # at most as many pneumonia images as breast ones x 4, so the classes stay balanced enough
        pi, pl = pneu[f"{split}_images"], pneu[f"{split}_labels"][:, 0]
        bi, bl = breast[f"{split}_images"], breast[f"{split}_labels"][:, 0]
        keep = rng.permutation(len(pi))[: 4 * len(bi)]
        images = np.concatenate([pi[keep], bi])
        kind = np.concatenate([pl[keep], 2 + bl])  # 0-1 pneumonia's, 2-3 breast's
        tint = rng.integers(0, 2, len(images))
        blood[f"{split}_images"] = _tint(images, tint)
        blood[f"{split}_labels"] = (2 * kind + tint).astype(np.uint8)[:, None]
        labels = np.zeros((len(pi), 14), np.uint8)
        labels[:, 0] = pl
        labels[:, 1] = pi.reshape(len(pi), -1).mean(1) > np.median(pi)
        labels[:, 2] = pi[:, :, :14].mean((1, 2)) > pi[:, :, 14:].mean((1, 2))
        chest[f"{split}_images"], chest[f"{split}_labels"] = pi, labels
        rgb = _tint(images, rng.integers(0, 2, len(images)))
        brightness = rgb.reshape(len(rgb), -1).mean(1)
        edges = np.quantile(brightness, [0.2, 0.4, 0.6, 0.8]) if split == "train" else retina["edges"]
        retina["edges"] = edges
        retina[f"{split}_images"] = rgb
        retina[f"{split}_labels"] = np.digitize(brightness, edges).astype(np.uint8)[:, None]
    retina.pop("edges")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for flag, arrays in (("bloodmnist", blood), ("chestmnist", chest), ("retinamnist", retina)):
        np.savez_compressed(out / f"{flag}.npz", **arrays)
        paths.append(out / f"{flag}.npz")
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    src = shared_medmnist_dir()
    for p in make(Path(sys.argv[1]), src):
        print(p)
