"""What one training run reads: MedMNIST's splits and one's own labelled images, their features,
the held-out sets an epoch competes on, the compiler's calibration images, and each epoch's
moved copies of the training images."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..config import ModelConfig, PipelineConfig, TrainConfig
from .augment import random_affine, upload_like
from .data import Split, dataset_info, load_split
from .features import FeatureNorm, features, needs_norm, stage_of

CALIBRATION_SIZE = 512


def augment(images: np.ndarray, tc: TrainConfig, rng: np.random.Generator) -> np.ndarray:
    """One epoch's random copy of ``images`` (float32 0..255): framing, then an upload's round trips."""
    moved = random_affine(images, tc.augment_shift, tc.augment_rotate, tc.augment_scale, rng, tc.augment_stretch)
    if tc.augment_upload:
        moved = upload_like(moved, rng, tc.augment_upload)
    return moved


def fit_norm(model_cfg, clean: list[np.ndarray]) -> FeatureNorm | None:
    """The model's scaling of its features, fitted on the clean training images (None: pixels)."""
    if not needs_norm(model_cfg):
        return None
    return FeatureNorm.fit(np.concatenate([stage_of(model_cfg)(c) for c in clean]))


def held_out_sets(images, feat: Callable[[np.ndarray], np.ndarray], framed: bool, info,
                  size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(features, labels)] of the labelled images' held-out part as uploaded and, with ``framed``,
    in each framing an upload comes in (centre crops, natural aspect ratio, squeezed)."""
    held = images.holdout_index if images is not None else np.arange(0)
    if not len(held):
        return []
    sets = [(feat(images.clean[held]), images.labels[held])]
    if framed:
        sets += [(feat(x), y) for x, y in images.framed(info, size, info.n_channels).values()]
    return sets


def prepared_images(cfg: PipelineConfig, images=None, say: Callable[[str], None] = lambda _m: None,
                    progress: Callable[[int, int], None] | None = None):
    """``images`` if given, else the labelled images of ``cfg.data.images`` prepared (read, put
    through the upload path, augmented: :func:`engine.learn.labelled.training_images`), else None."""
    if images is not None or not cfg.data.images:
        return images
    from .labelled import training_images

    say(f"reading and augmenting the labelled images in {cfg.data.images}")
    return training_images(cfg.data, dataset_info(cfg.data.dataset), cfg.train.image_copies, cfg.train.seed,
                           progress=progress)


@dataclass
class TrainingSet:
    """The images of one run and their features (a fixed transform of fixed images: computed once)."""

    model_cfg: ModelConfig  # its feature stage
    train_split: Split  # MedMNIST's training images (none with ``images_only``)
    val_split: Split
    images: object  # the prepared labelled images (engine.learn.labelled.TrainingImages), or None
    own: np.ndarray  # indices of the labelled images that train
    held: np.ndarray  # indices of the labelled images held out
    norm: FeatureNorm | None
    x_medmnist: torch.Tensor  # features of the MedMNIST training images as they are
    y_train: torch.Tensor  # labels of MedMNIST's training images, then of the labelled ones
    y_all: np.ndarray
    x_val: np.ndarray
    held_sets: list[tuple[np.ndarray, np.ndarray]]  # [(features, labels)] of the held-out images, per framing
    versions_of_own: np.ndarray | None  # (copies + 1, n, ...) each labelled training image's real-upload versions
    x_versions: np.ndarray | None  # their features
    calibration: np.ndarray  # uint8 training images the compiler calibrates on

    @property
    def info(self):
        return self.val_split.info

    def feat(self, im: np.ndarray) -> np.ndarray:
        return features(im, self.model_cfg, self.norm)

    @property
    def held_x(self) -> np.ndarray | None:
        return np.concatenate([x for x, _y in self.held_sets]) if self.held_sets else None

    @property
    def held_y(self) -> np.ndarray | None:
        return np.concatenate([y for _x, y in self.held_sets]) if self.held_sets else None

    def epoch_inputs(self, tc: TrainConfig, aug_rng: np.random.Generator,
                     copy_rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
        """One epoch's training features and the images they come from: MedMNIST's moved (with
        augmentation), then each labelled image as one of its real-upload versions, or as it is."""
        moved, x = self.train_split.images, self.x_medmnist
        if tc.augments and len(self.train_split):
            moved = augment(self.train_split.images, tc, aug_rng)
            x = torch.from_numpy(self.feat(moved))
        n = len(self.own)
        if n:
            pick = copy_rng.integers(0, len(self.versions_of_own), n)
            versions = self.versions_of_own[pick, np.arange(n)]
            moved = np.concatenate([np.asarray(moved, dtype=np.float32), versions.astype(np.float32)])
            x = torch.cat([x, torch.from_numpy(self.x_versions[pick, np.arange(n)])])
        return x, moved


def training_set(cfg: PipelineConfig, images=None, say: Callable[[str], None] = lambda _m: None,
                 image_progress: Callable[[int, int], None] | None = None) -> TrainingSet:
    """Load, prepare and featurize what a run of ``cfg`` reads.

    With ``cfg.data.images`` (or ``images``, a prepared :class:`engine.learn.labelled.TrainingImages`)
    the labelled images train too, and their held-out part validates next to MedMNIST's validation
    split. ``cfg.data.images_only``: the images alone train."""
    tc, mc = cfg.train, cfg.model
    val_split = load_split(cfg.data, "val")
    info = val_split.info
    images = prepared_images(cfg, images, say, image_progress)
    train_split = load_split(cfg.data, "train").head(tc.limit_train)
    if images is not None and cfg.data.images_only:
        train_split = train_split.subset(np.arange(0))
    own = images.train_index if images is not None else np.arange(0)
    own_labels = images.labels[own] if images is not None else np.zeros(0, np.int64)
    held = images.holdout_index if images is not None else np.arange(0)
    if len(train_split) + len(own) == 0:
        raise ValueError("nothing to train on: the labelled folder has no training image")
    norm = fit_norm(mc, [train_split.images] + ([images.clean[own]] if len(own) else []))

    def feat(im: np.ndarray) -> np.ndarray:
        return features(im, mc, norm)

    y_all = np.concatenate([train_split.targets, own_labels]) if len(own) else train_split.targets
    # The compiler's input set is stored with the model (calibration.npz): MedMNIST's training
    # images where the model learned from them, so that no image of one's own folder is stored
    # (a hospital's images stay where they are); the folder's only for a model trained on it alone.
    pool_images = train_split.images if len(train_split) else images.clean[own]
    calib_idx = np.random.default_rng(tc.seed).permutation(len(pool_images))[:CALIBRATION_SIZE]
    # each labelled training image's real-upload versions and the image as uploaded, gathered once
    versions_of_own = np.concatenate([images.copies[:, own], images.clean[own][None]]) if len(own) else None
    return TrainingSet(
        model_cfg=mc, train_split=train_split, val_split=val_split, images=images, own=own, held=held, norm=norm,
        x_medmnist=torch.from_numpy(feat(train_split.images)), y_train=torch.from_numpy(y_all), y_all=y_all,
        x_val=feat(val_split.images), held_sets=held_out_sets(images, feat, tc.select_framed, info, cfg.data.size),
        versions_of_own=versions_of_own,
        x_versions=(np.stack([feat(v.astype(np.float32)) for v in versions_of_own])
                    if versions_of_own is not None else None),
        calibration=pool_images[np.sort(calib_idx)])
