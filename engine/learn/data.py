"""MedMNIST loading and validation, driven by ``medmnist.INFO``.

A subset is read from ``<data_dir>/<flag>.npz`` (``<flag>_<size>.npz`` above 28 px), the
official file layout. When the file is missing, medmnist's own download is tried (it fails
offline); every problem ends in one :class:`DataError` that names the file and what to do.
"""

from __future__ import annotations

import hashlib
import warnings
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..config import REPO_ROOT, DataConfig


def _medmnist_info() -> dict:
    """``medmnist.INFO``, read from medmnist's own ``info.py`` without importing the package:
    its ``__init__`` imports torch and scikit-learn (about 2 s), which the dashboard's first page
    would wait for."""
    import importlib.util
    import sys

    if "medmnist" in sys.modules:
        return sys.modules["medmnist"].INFO
    folder = Path(importlib.util.find_spec("medmnist").submodule_search_locations[0])
    spec = importlib.util.spec_from_file_location("_medmnist_info", folder / "info.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.INFO


INFO = _medmnist_info()

SPLITS = ("train", "val", "test")
SIZES = (28, 64, 128, 224)
MULTI_LABEL = "multi-label, binary-class"


class DataError(Exception):
    """A dataset file is missing, corrupt or not in the MedMNIST format."""


def available_datasets() -> list[str]:
    """All 2D MedMNIST subsets medmnist knows about."""
    return sorted(flag for flag in INFO if not flag.endswith("3d"))


def present_datasets(data_dir: Path, size: int = 28) -> list[str]:
    """The 2D subsets whose file is in ``data_dir``."""
    return [f for f in available_datasets() if (Path(data_dir) / file_name(f, size)).exists()]


@dataclass(frozen=True)
class DatasetInfo:
    """What the pipeline needs to know about a subset, read from ``medmnist.INFO``."""

    flag: str
    task: str
    labels: dict[int, str]
    n_channels: int
    n_samples: dict[str, int]
    md5: dict[int, str]

    @property
    def multi_label(self) -> bool:
        return self.task == MULTI_LABEL

    @property
    def n_outputs(self) -> int:
        # Binary tasks use two logits with softmax so every task but multi-label is the same.
        return len(self.labels)

    @property
    def n_label_columns(self) -> int:
        return len(self.labels) if self.multi_label else 1


def dataset_info(flag: str) -> DatasetInfo:
    flag = flag.lower()
    if flag not in INFO or flag.endswith("3d"):
        raise DataError(
            f"Unknown dataset '{flag}'. Choose one of: {', '.join(available_datasets())}."
        )
    info = INFO[flag]
    md5 = {28: info["MD5"]}
    for s in SIZES[1:]:
        if f"MD5_{s}" in info:
            md5[s] = info[f"MD5_{s}"]
    return DatasetInfo(
        flag=flag,
        task=info["task"],
        labels={int(k): v for k, v in info["label"].items()},
        n_channels=int(info["n_channels"]),
        n_samples=dict(info["n_samples"]),
        md5=md5,
    )


def file_name(flag: str, size: int = 28) -> str:
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


@dataclass(frozen=True)
class Split:
    """One split of a subset: raw uint8 images and integer labels, as in the file."""

    dataset: str
    split: str
    images: np.ndarray  # (N, H, W) or (N, H, W, 3), uint8
    labels: np.ndarray  # (N, 1) class index, or (N, L) 0/1 for multi-label
    info: DatasetInfo

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices) -> "Split":
        idx = np.asarray(indices)
        return Split(self.dataset, self.split, self.images[idx], self.labels[idx], self.info)

    def head(self, n: int) -> "Split":
        return self if not n or n >= len(self) else self.subset(np.arange(n))

    @property
    def targets(self) -> np.ndarray:
        """Class indices (N,) for single-label tasks, the (N, L) 0/1 matrix for multi-label."""
        return self.labels.astype(np.float32) if self.info.multi_label else self.labels[:, 0].astype(np.int64)


def to_features(images: np.ndarray, pool: float = 1, levels: int = 0) -> np.ndarray:
    """uint8 images (N, H, W[, C]) -> float32 (N, F) in [-1, 1], the FCNN's input.

    ``pool > 1`` averages ``pool x pool`` pixel blocks first: client-side preprocessing in the
    clear (the data owner's own computation) that divides the number of encrypted inputs. When
    the size is not a multiple of a whole ``pool`` the trailing rows and columns are dropped (28 px
    with ``pool=3``: the top-left 27x27 pixels, 9x9 inputs); a fractional ``pool`` averages the
    whole image onto a ``round(28 / pool)`` grid by area (``pool=2.8``: 10x10 inputs).

    ``levels > 0`` appends :func:`intensity_levels` of the full image: ``levels`` values per channel.
    """
    x = np.asarray(images, dtype=np.float32)
    if pool > 1 and pool != int(pool):  # a fractional factor: area averaging onto a round(H / pool) grid
        n, h, w = x.shape[:3]
        rows, cols = area_matrix(h, round(h / pool)), area_matrix(w, round(w / pool))
        x = np.einsum("ih,nhw...,jw->nij...", rows, x, cols)
    elif pool > 1:
        pool = int(pool)
        n, h, w = x.shape[:3]
        hh, ww = h // pool, w // pool
        x = x[:, : hh * pool, : ww * pool].reshape(n, hh, pool, ww, pool, *x.shape[3:]).mean(axis=(2, 4))
    x = x.reshape(len(x), int(np.prod(x.shape[1:])))  # (0, F) for no images
    x = x / 127.5 - 1.0
    if levels:
        x = np.concatenate([x, intensity_levels(images, levels)], axis=1)
    return x


def intensity_levels(images: np.ndarray, levels: int) -> np.ndarray:
    """(N, C' * levels) float32 in [-1, 1]: for each channel, the share of pixels brighter than
    ``255 * k / (levels + 1)`` for k = 1..levels (a cumulative intensity histogram at fixed levels,
    scaled like the pixels); colour images also get it for their brightness (the mean of the
    channels), so C' is 1 for grayscale and 4 for RGB. Data-independent: the same levels for every
    image and dataset.

    One level's share quantizes to the input's few bits; their sum (what a neuron can add up) is
    the channel's mean brightness to ``levels`` times finer steps."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., None]
    if x.shape[-1] > 1:
        x = np.concatenate([x, x.mean(axis=-1, keepdims=True)], axis=-1)
    n, c = len(x), x.shape[-1]
    out = np.empty((n, c, levels), np.float32)
    for k in range(levels):
        out[:, :, k] = (x > 255.0 * (k + 1) / (levels + 1)).mean(axis=(1, 2))
    return out.reshape(n, c * levels) * 2.0 - 1.0


def area_matrix(size: int, out: int) -> np.ndarray:
    """(out, size) weights averaging each of ``out`` equal spans of ``size`` pixels, partial
    pixels counted by their covered share (what an area resize computes): a fixed transform."""
    edges = np.linspace(0, size, out + 1)
    m = np.zeros((out, size), np.float32)
    for i in range(out):
        lo, hi = edges[i], edges[i + 1]
        for px in range(int(np.floor(lo)), min(size, int(np.ceil(hi)))):
            m[i, px] = min(hi, px + 1) - max(lo, px)
    return m / m.sum(axis=1, keepdims=True)


def load_split(cfg: DataConfig, split: str) -> Split:
    """Load and validate one split of ``cfg.dataset``."""
    if split not in SPLITS:
        raise DataError(f"Unknown split '{split}'. Choose one of: {', '.join(SPLITS)}.")
    path = locate(cfg)
    stat = path.stat()  # part of the cache key: a replaced file is read again
    arrays = _load_file(str(path), cfg.dataset.lower(), cfg.size, stat.st_mtime_ns, stat.st_size)
    return Split(cfg.dataset.lower(), split, arrays[f"{split}_images"], arrays[f"{split}_labels"], dataset_info(cfg.dataset))


def locate(cfg: DataConfig) -> Path:
    """Path of the subset's file, downloading it with medmnist if allowed and absent."""
    info = dataset_info(cfg.dataset)
    if cfg.size not in SIZES:
        raise DataError(f"Unsupported image size {cfg.size}. Choose one of: {SIZES}.")
    path = cfg.path / file_name(info.flag, cfg.size)
    if path.exists():
        return path
    reason = "downloads are disabled"
    if cfg.allow_download:
        reason = _try_download(info.flag, cfg.size, cfg.path)
        if path.exists():
            return path
    raise DataError(
        f"{path} not found and could not be downloaded ({reason}). Put the official "
        f"'{path.name}' from MedMNIST (zenodo record 10519652) in that folder, or point "
        f"--data-dir / MEDMNIST_DIR at a folder that has it."
    )


def _try_download(flag: str, size: int, root: Path) -> str:
    import medmnist

    try:
        root.mkdir(parents=True, exist_ok=True)
        cls = getattr(medmnist, INFO[flag]["python_class"])
        cls(split="test", root=str(root), size=size, download=True)
        return "downloaded"
    except Exception as exc:  # network errors come in many types
        return f"download failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def md5sum(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


@lru_cache(maxsize=8)
def _load_file(path_str: str, flag: str, size: int, _mtime_ns: int = 0, _bytes: int = 0) -> dict[str, np.ndarray]:
    """Read and validate a whole file once per process (the arrays are small)."""
    path = Path(path_str)
    info = dataset_info(flag)
    fix = f"Replace {path} with the official MedMNIST file (or delete it to download again)."
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path} is corrupt or truncated ({type(exc).__name__}: {exc}). {fix}") from None

    expected = info.md5.get(size)
    if expected and md5sum(path) != expected:
        # Not fatal: locally generated files of the same format are legitimate (tests, new
        # releases). The structural checks below still guard every use.
        warnings.warn(f"{path}: md5 differs from medmnist.INFO ({expected}); not the official release.")

    for split in SPLITS:
        for part in ("images", "labels"):
            if f"{split}_{part}" not in arrays:
                raise DataError(f"{path} has no '{split}_{part}' array: not a MedMNIST file. {fix}")
        _check_split(path, info, size, split, arrays[f"{split}_images"], arrays[f"{split}_labels"], fix)
    return arrays


def _check_split(path, info: DatasetInfo, size, split, images, labels, fix) -> None:
    where = f"{path} [{split}]"
    shape = (size, size) if info.n_channels == 1 else (size, size, info.n_channels)
    if images.dtype != np.uint8:
        raise DataError(f"{where}: images are {images.dtype}, expected uint8. {fix}")
    if images.ndim != 1 + len(shape) or images.shape[1:] != shape:
        raise DataError(f"{where}: images have shape {images.shape}, expected (N, {', '.join(map(str, shape))}). {fix}")
    if labels.ndim != 2 or labels.shape != (len(images), info.n_label_columns):
        raise DataError(
            f"{where}: labels have shape {labels.shape}, expected ({len(images)}, {info.n_label_columns}). {fix}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: labels are {labels.dtype}, expected integers. {fix}")
    if len(labels):
        hi = 1 if info.multi_label else len(info.labels) - 1
        if labels.min() < 0 or labels.max() > hi:
            raise DataError(
                f"{where}: labels range over [{labels.min()}, {labels.max()}], "
                f"but '{info.flag}' ({info.task}) allows [0, {hi}]. {fix}"
            )


SAMPLES_DIR = REPO_ROOT / "samples"


def load_samples(flag: str) -> Split:
    """The few real test images shipped in ``samples/<flag>.npz`` for the offline demo."""
    info = dataset_info(flag)
    path = SAMPLES_DIR / f"{info.flag}.npz"
    if not path.exists():
        raise DataError(f"No shipped samples for '{info.flag}' ({path} is absent).")
    with np.load(path) as f:
        return Split(info.flag, "test", f["test_images"], f["test_labels"], info)


def gallery_split(cfg: DataConfig) -> tuple[Split, str]:
    """The test split if its file is available, else the shipped samples; with a description that
    names the dataset and split, never a path."""
    try:
        # the dataset and split only: a hosted demo must not show its visitors the server's file system
        return load_split(cfg, "test"), f"{cfg.dataset} test split"
    except DataError:
        samples = load_samples(cfg.dataset)
        return samples, f"{cfg.dataset}: {len(samples)} shipped test samples (dataset file not found)"
