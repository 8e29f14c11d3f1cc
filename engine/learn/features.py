"""The client's feature stage: a fixed, data-independent transform from the image the upload path
makes to the values the client quantizes and encrypts.

One function, :func:`features`, is the whole of it. Training, the guard, ``evaluate``, ``predict``,
the dashboard and the service's clients call it, so an image becomes the same values everywhere.

Kinds (``ModelConfig.features``; a pluggable part is a :class:`FeatureStage`):

- ``pixels``: the image's pixels, averaged onto a grid (``input_pool``). This is the stage of every
  model shipped before it, and their answers and content hashes are unchanged.
- ``scattering``: the 2D wavelet scattering transform (Mallat 2012; Kymatio's implementation,
  Andreux et al. 2020). It is a cascade of Morlet wavelet filters at ``scattering_j`` scales and
  ``scattering_l`` orientations, with moduli and local averages, and it learns nothing. Its
  coefficients are locally invariant to shifts and stable to small deformations, which is what
  reframing does to an upload. They are averaged onto a ``feature_grid`` x ``feature_grid`` grid
  and taken as ``log(eps + S)``, which brings the orders' very different magnitudes together.

Both may append ``input_levels`` (:func:`engine.learn.data.intensity_levels`).

What is learned stays with the model. The per-feature standardization (:class:`FeatureNorm`,
fitted on the training images and stored in ``model.json``) is a scaling parameter of the
model, like the input quantizer's scale in ``client.zip``. The client applies it before it
quantizes. The server never sees the image, its features or their scaling: only ciphertexts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

import numpy as np

from ..config import ModelConfig

KINDS = ("pixels", "scattering")
LOG_EPS = 1e-3  # scattering: log(LOG_EPS + S) of the coefficients (images scaled to [0, 1])


class FeatureStage(Protocol):
    """A fixed transform of uint8 images (N, H, W[, C]) into float32 features (N, F)."""

    kind: str

    def __call__(self, images: np.ndarray) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Pixels:
    """Pixels averaged onto a grid, scaled to [-1, 1] (:func:`engine.learn.data.to_features`)."""

    pool: float = 1
    levels: int = 0
    kind: str = "pixels"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        from .data import to_features

        return to_features(images, self.pool, self.levels)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "input_pool": self.pool, "input_levels": self.levels}


@dataclass(frozen=True)
class Scattering:
    """Kymatio's 2D scattering (order 2) of each channel, averaged onto ``grid`` x ``grid``, as
    ``log(eps + S)``; then the intensity levels, if any."""

    j: int = 2
    l: int = 8  # noqa: E741 - Kymatio's name for the number of orientations
    grid: int = 2
    levels: int = 0
    kind: str = "scattering"

    @property
    def channels(self) -> int:
        """Scattering channels per image channel: 1 + J L + L^2 J (J - 1) / 2 (81 at J=2, L=8)."""
        return 1 + self.j * self.l + self.l * self.l * self.j * (self.j - 1) // 2

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = np.asarray(images, dtype=np.float32)
        n = len(x)
        if x.ndim == 4:  # (N, H, W, C) -> (N, C, H, W): Kymatio transforms the last two axes
            x = np.moveaxis(x, -1, 1)
        h, w = x.shape[-2:]
        if h % 2**self.j or w % 2**self.j:
            raise ValueError(f"the scattering at J={self.j} reads images whose sides are multiples of "
                             f"{2 ** self.j}; these are {h}x{w}")
        out = np.empty((n, int(np.prod(x.shape[1:-2], dtype=int)) * self.channels * self.grid ** 2), np.float32)
        transform = _scattering(self.j, h, w, self.l)
        rows, cols = _area(h // 2**self.j, self.grid), _area(w // 2**self.j, self.grid)
        for i in range(0, n, 512):  # bounded memory for large sets
            s = transform(x[i : i + 512] / 255.0)  # (B, [C,] K, h / 2^J, w / 2^J)
            s = np.einsum("ih,...hw,jw->...ij", rows, s, cols)
            out[i : i + 512] = np.log(LOG_EPS + s.reshape(len(s), -1))
        if self.levels:
            from .data import intensity_levels

            out = np.concatenate([out, intensity_levels(images, self.levels)], axis=1)
        return out

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "scattering_j": self.j, "scattering_l": self.l, "feature_grid": self.grid,
                "input_levels": self.levels}


def stage_of(model: ModelConfig) -> FeatureStage:
    """The feature stage a model's config names."""
    if model.features == "scattering":
        return Scattering(model.scattering_j, model.scattering_l, model.feature_grid, model.input_levels)
    return Pixels(model.input_pool, model.input_levels)


@dataclass(frozen=True)
class FeatureNorm:
    """The model's use of its stage's output: which features it reads (``select``; None: all) and
    their standardization ``(x - mean) / scale``, fitted on the training images. Stored with the
    model (``model.json``) and applied by the client before the input quantizer. A pruned model
    reads only the features some neuron keeps (:func:`read_only_used`): the others are never
    encrypted."""

    mean: np.ndarray
    scale: np.ndarray
    select: np.ndarray | None = None

    @classmethod
    def fit(cls, x: np.ndarray) -> "FeatureNorm":
        x = np.asarray(x, dtype=np.float64)
        return cls(x.mean(axis=0).astype(np.float32), np.maximum(x.std(axis=0), 1e-6).astype(np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.select is not None:
            if len(x) and x.shape[1] <= int(self.select.max()):
                raise ValueError(f"the images give {x.shape[1]} features each, but the model reads feature "
                                 f"{int(self.select.max())}")
            x = x[:, self.select]
        if x.shape[1] != len(self.mean):
            raise ValueError(f"the images give {x.shape[1]} features each, but the model's scaling is for "
                             f"{len(self.mean)}")
        return ((x - self.mean) / self.scale).astype(np.float32)

    def keep(self, columns: np.ndarray) -> "FeatureNorm":
        """The scaling of only ``columns`` of this one's output."""
        chosen = columns if self.select is None else self.select[columns]
        return FeatureNorm(self.mean[columns], self.scale[columns], np.asarray(chosen, dtype=np.int64))

    def to_dict(self) -> dict[str, list]:
        d = {"mean": [float(v) for v in self.mean], "scale": [float(v) for v in self.scale]}
        if self.select is not None:
            d["select"] = [int(v) for v in self.select]
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "FeatureNorm | None":
        if not d:
            return None
        select = np.asarray(d["select"], np.int64) if d.get("select") is not None else None
        return cls(np.asarray(d["mean"], np.float32), np.asarray(d["scale"], np.float32), select)


def needs_norm(model: ModelConfig) -> bool:
    """Whether a model's features are standardized (every kind but ``pixels``, already in [-1, 1])."""
    return model.features != "pixels"


def features(images: np.ndarray, model: ModelConfig, norm: FeatureNorm | None = None) -> np.ndarray:
    """The input of a model with config ``model`` for uint8 images (N, H, W[, C]): its feature
    stage, then its standardization ``norm`` (required for every kind but ``pixels``). This is
    the client's whole preprocessing in the clear."""
    x = stage_of(model)(images)
    if norm is not None:
        return norm(x)
    if needs_norm(model):
        raise ValueError(f"a '{model.features}' model's features need its stored scaling (feature_norm)")
    return x


def describe(model: ModelConfig, norm: FeatureNorm | None, size: int, channels: int) -> dict[str, Any]:
    """What a remote client needs to compute a model's input: the stage, the image it reads and the
    model's scaling (``GET /circuits``); :func:`from_description` reads it back."""
    return {**stage_of(model).describe(), "reads": [size, size, channels],
            "feature_norm": norm.to_dict() if norm is not None else None}


def from_description(d: dict[str, Any]) -> tuple[ModelConfig, FeatureNorm | None]:
    """A model config carrying only the feature stage of a :func:`describe` dict, and its scaling."""
    known = {"kind": "features", "input_pool": "input_pool", "input_levels": "input_levels",
             "scattering_j": "scattering_j", "scattering_l": "scattering_l", "feature_grid": "feature_grid"}
    fields = {known[k]: v for k, v in d.items() if k in known}
    return ModelConfig(**fields), FeatureNorm.from_dict(d.get("feature_norm"))


def remote_features(images: np.ndarray, circuit: dict[str, Any]) -> np.ndarray:
    """:func:`features` for a circuit the service describes (``GET /circuits``); a service from before
    the feature stage describes only its pooling and levels."""
    stage = circuit.get("feature_stage") or {"kind": "pixels", "input_pool": circuit.get("input_pool", 1),
                                             "input_levels": circuit.get("input_levels", 0)}
    model, norm = from_description(stage)
    return features(images, model, norm)


def summary(model: ModelConfig, in_features: int | None = None) -> str:
    """One line naming a model's feature stage, for the CLI and the pages."""
    stage = stage_of(model)
    levels = f" + {model.input_levels} intensity levels per channel" if model.input_levels else ""
    if isinstance(stage, Scattering):
        text = (f"wavelet scattering (Kymatio, J={stage.j}, L={stage.l}: {stage.channels} channels), "
                f"averaged onto {stage.grid}x{stage.grid}, log, standardized by the model{levels}")
    elif stage.pool > 1:
        text = f"pixels averaged by {stage.pool:g}{levels}"
    else:
        text = f"pixels{levels}"
    return f"{text}: {in_features} encrypted inputs" if in_features else text


@lru_cache(maxsize=8)
def _scattering(j: int, h: int, w: int, l: int):  # noqa: E741
    # kymatio.numpy imports the 1D, 2D and 3D frontends; its 3D module needs SciPy < 1.15
    # (scipy.special.sph_harm), pinned in requirements.txt
    from kymatio.numpy import Scattering2D

    return Scattering2D(J=j, shape=(h, w), L=l, max_order=2)


@lru_cache(maxsize=32)
def _area(size: int, out: int) -> np.ndarray:
    from .data import area_matrix

    return area_matrix(size, out)
