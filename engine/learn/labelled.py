"""Labelled images in a folder or ``.zip``: one subfolder per class, read the same way for
training (``train --images``) and validation (``evaluate --images``).

Folder names match the dataset's label names case-insensitively (or any comma-separated part
of one: BreastMNIST's ``normal, benign`` takes ``normal`` and ``benign``), or label indices;
a label map (``NORMAL=0,PNEUMONIA=1``) names others.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from .data import DatasetInfo
from .images import EXTENSIONS, MAX_ARCHIVE_FILES, MAX_BYTES

IGNORED = ("__MACOSX", ".DS_Store", "Thumbs.db")


class LabelError(ValueError):
    """The folder's layout does not say each image's label; the message names what to change."""


def parse_label_map(text: str | None) -> dict[str, int]:
    """``"NORMAL=0,PNEUMONIA=1"`` -> ``{"normal": 0, "pneumonia": 1}`` (names case-insensitive)."""
    out: dict[str, int] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, sep, index = part.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip().lower()] = int(index)
        except ValueError:
            raise LabelError(f"--label-map takes NAME=INDEX pairs separated by commas, got '{part.strip()}'.") from None
    return out


def label_of(folder: str, info: DatasetInfo, label_map: dict[str, int]) -> int | None:
    """The label index a class folder's name stands for, or None."""
    key = folder.strip().lower()
    if key in label_map:
        return label_map[key]
    for index, name in info.labels.items():
        if key == name.lower() or key in (p.strip().lower() for p in name.split(",")):
            return index
    if key.isdigit() and int(key) in info.labels:
        return int(key)
    return None


@dataclass
class LabelledFile:
    name: str  # the path inside the folder or archive, class folder first
    label: int
    data: bytes | None
    error: str | None = None  # set when the file could not be read at all


def _members(source: Path | bytes, name: str) -> list[tuple[str, int, object]]:
    """(relative posix path, size, reader) of every file in a folder or zip archive."""
    if isinstance(source, Path) and source.is_dir():
        return [(p.relative_to(source).as_posix(), p.stat().st_size, p.read_bytes)
                for p in sorted(source.rglob("*")) if p.is_file()]
    data = source.read_bytes() if isinstance(source, Path) else source
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise LabelError(f"{name} is neither a folder nor a readable zip archive.") from None
    return [(m.filename, m.file_size, (lambda m=m: archive.read(m))) for m in archive.infolist() if not m.is_dir()]


def read_labelled(source: Path | bytes, info: DatasetInfo, label_map: dict[str, int] | None = None,
                  name: str | None = None, limit: int = MAX_ARCHIVE_FILES * 10) -> list[LabelledFile]:
    """Every image file under ``source`` (a folder, a zip's path or its bytes) with the label of
    its class folder. A single top folder holding the class folders (a zipped folder) is looked
    through. Files that are not images by extension are skipped; a class folder that matches no
    label is a :class:`LabelError` naming it."""
    if info.multi_label:
        raise LabelError(f"{info.flag} is multi-label: one folder per class cannot say an image's labels.")
    label_map = label_map or {}
    name = name or (str(source) if isinstance(source, Path) else "the archive")
    if isinstance(source, Path) and not source.exists():
        raise LabelError(f"{source} does not exist.")
    files = [(PurePosixPath(p).parts, size, read) for p, size, read in _members(source, name)
             if not any(part in IGNORED or part.startswith("._") for part in PurePosixPath(p).parts)]
    images = [f for f in files if f[0][-1].rsplit(".", 1)[-1].lower() in (*EXTENSIONS, "dcm", "dicom")]
    if len(images) > limit:
        raise LabelError(f"{name} holds {len(images)} images; the limit is {limit}. Split it.")
    # a zipped folder: one top folder around the class folders
    while images and all(len(parts) > 2 for parts, _s, _r in images) and len({p[0] for p, _s, _r in images}) == 1:
        images = [(parts[1:], size, read) for parts, size, read in images]
    loose = [("/".join(p), s, r) for p, s, r in images if len(p) < 2]
    if loose and len(loose) == len(images):
        raise LabelError(f"{name} has no class folders: put each image in a folder named after its label "
                         f"({', '.join(info.labels.values())}) or its index.")
    classes = sorted({parts[0] for parts, _s, _r in images if len(parts) >= 2})
    unknown = [c for c in classes if label_of(c, info, label_map) is None]
    if unknown:
        names = "; ".join(f"{i} = {n}" for i, n in info.labels.items())
        raise LabelError(f"Folder '{unknown[0]}' in {name} matches no {info.flag} label ({names}). Rename it, or map it "
                         f"with --label-map, e.g. {unknown[0]}={min(info.labels)}.")
    out = []
    for parts, size, read in images:
        path = "/".join(parts)
        if len(parts) < 2:
            out.append(LabelledFile(path, -1, None, "not in a class folder"))
        elif size > MAX_BYTES:
            out.append(LabelledFile(path, label_of(parts[0], info, label_map), None,
                                    f"{size / 1e6:.0f} MB; the limit is {MAX_BYTES // 2**20} MB"))
        else:
            out.append(LabelledFile(path, label_of(parts[0], info, label_map), read()))
    if not out:
        raise LabelError(f"{name} holds no image ({', '.join(EXTENSIONS)}, dcm).")
    return out


# -- training from a labelled folder (train --images)
TRAIN_LIMIT = 50_000  # images a training folder may hold


@dataclass
class TrainingImages:
    """A labelled folder prepared for training: each image decoded once and put through the
    upload path (:func:`engine.learn.images.to_model_input`) as it is (``clean``) and as
    ``copies`` random real-upload versions (:func:`engine.learn.augment.real_upload`, made on
    the full-size image). A stratified ``holdout`` share is kept for validation."""

    source: str
    names: list[str]
    labels: np.ndarray  # (N,) class indices
    clean: np.ndarray  # (N, size, size[, C]) uint8: what the model sees of each image as uploaded
    copies: np.ndarray  # (copies, N, size, size[, C]) uint8
    holdout: np.ndarray  # bool (N,): held out for validation (never trained on)
    unreadable: list[tuple[str, str]]
    content_hash: str  # sha256 over the sorted (name, label, file hash)
    label_map: str = ""  # how the class folders were read (to read the held-out files again)
    _framed: dict | None = None  # held_out_framings without a squeeze estimator, made once

    def framed(self, info: DatasetInfo, size: int, channels: int,
               framing=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The held-out images in each upload framing (:func:`held_out_framings`); without a squeeze
        estimator (training, and every model that learned real uploads) made once and kept."""
        if framing is not None:
            return held_out_framings(self, info, size, channels, self.label_map, framing)
        if self._framed is None:
            self._framed = held_out_framings(self, info, size, channels, self.label_map)
        return self._framed

    @property
    def train_index(self) -> np.ndarray:
        return np.flatnonzero(~self.holdout)

    @property
    def holdout_index(self) -> np.ndarray:
        return np.flatnonzero(self.holdout)

    def counts(self, info: DatasetInfo, part: str) -> dict[str, int]:
        idx = {"train": self.train_index, "holdout": self.holdout_index, "all": np.arange(len(self.labels))}[part]
        return {info.labels[c]: int((self.labels[idx] == c).sum()) for c in sorted(info.labels)}

    def provenance(self, info: DatasetInfo) -> dict:
        """What ``model.json`` records of this source."""
        return {"kind": "images", "source": Path(self.source).name or self.source, "files": len(self.names),
                "unreadable": len(self.unreadable), "train": self.counts(info, "train"),
                "holdout": self.counts(info, "holdout"), "sha256": self.content_hash, "copies": int(len(self.copies))}


def stratified_holdout(labels: np.ndarray, share: float, seed: int = 0) -> np.ndarray:
    """A boolean mask holding out ``share`` of each class (at least one image of a class with two
    or more, none when ``share`` is 0)."""
    mask = np.zeros(len(labels), dtype=bool)
    if share <= 0:
        return mask
    rng = np.random.default_rng(seed)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(share * len(idx)))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        else:
            k = 0
        mask[idx[:k]] = True
    return mask


def files_hash(files: list[LabelledFile]) -> str:
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.name):
        h.update(f"{f.name}\0{f.label}\0".encode())
        h.update(hashlib.sha256(f.data or b"").digest())
    return h.hexdigest()


def _prepare_one(data: bytes, name: str, size: int, channels: int, copies: int, seed: int):
    from .augment import real_upload
    from .images import ImageError, _to_channels, decode, to_model_input

    try:
        original = _to_channels(decode(data, name), channels, [])  # the upload path's first step, done once
    except ImageError as exc:
        return None, str(exc)
    rng = np.random.default_rng(seed)
    clean = to_model_input(original, size, channels)
    out = [to_model_input(real_upload(original, rng), size, channels) for _ in range(copies)]
    return (clean, out), None


def prepare_training_images(files: list[LabelledFile], info: DatasetInfo, size: int, channels: int, source: str,
                            holdout: float = 0.1, copies: int = 8, seed: int = 0, cache_dir: Path | None = None,
                            progress=None, label_map: str = "") -> TrainingImages:
    """Decode and augment ``files`` (cached in ``cache_dir`` by content, settings and
    :data:`engine.learn.augment.REAL_UPLOAD`); ``progress(done, total)``."""
    import json

    from joblib import Parallel, delayed

    from ..config import cpu_cores
    from .augment import REAL_UPLOAD

    digest = files_hash(files)
    key = hashlib.sha256(json.dumps([digest, size, channels, copies, seed, REAL_UPLOAD, 1]).encode()).hexdigest()[:24]
    path = Path(cache_dir) / "trainsets" / f"{key}.npz" if cache_dir else None
    if path is not None and path.exists():
        with np.load(path, allow_pickle=False) as z:
            names = [str(n) for n in z["names"]]
            labels, clean, copied = z["labels"], z["clean"], z["copies"]
            unreadable = [tuple(map(str, u)) for u in z["unreadable"]]
        if progress:
            progress(len(files), len(files))
    else:
        ok = [f for f in files if f.error is None]
        unreadable = [(f.name, f.error) for f in files if f.error is not None]
        chunk = 64
        results = []
        jobs = Parallel(n_jobs=min(cpu_cores(), 4), return_as="generator")(
            delayed(_prepare_chunk)([(f.data, f.name) for f in ok[i:i + chunk]], size, channels, copies, seed + i)
            for i in range(0, len(ok), chunk))
        for i, part in enumerate(jobs):
            results.extend(part)
            if progress:
                progress(min(len(ok), (i + 1) * chunk), len(ok))
        names, labels_l, clean_l, copies_l = [], [], [], []
        for f, (res, err) in zip(ok, results):
            if res is None:
                unreadable.append((f.name, err))
                continue
            names.append(f.name)
            labels_l.append(f.label)
            clean_l.append(res[0])
            copies_l.append(np.stack(res[1]) if copies else np.zeros((0, *res[0].shape), np.uint8))
        if not names:
            raise LabelError(f"{source}: none of the {len(files)} images could be read.")
        labels = np.asarray(labels_l, dtype=np.int64)
        clean = np.stack(clean_l)
        copied = np.stack(copies_l, axis=1)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, names=np.asarray(names), labels=labels, clean=clean, copies=copied,
                     unreadable=np.asarray(unreadable, dtype=str).reshape(-1, 2))
            tmp.replace(path)
    return TrainingImages(source, names, labels, clean, copied, stratified_holdout(labels, holdout, seed),
                          unreadable, digest, label_map)


def _prepare_chunk(items, size, channels, copies, seed):
    return [_prepare_one(data, name, size, channels, copies, seed + j) for j, (data, name) in enumerate(items)]


def training_images(data, info: DatasetInfo, copies: int, seed: int = 0, cache_dir: Path | None = None,
                    progress=None) -> TrainingImages:
    """The labelled folder or zip named by ``data.images`` (a :class:`engine.config.DataConfig`),
    read and prepared for training."""
    from ..config import default_cache_dir

    source = Path(data.images)
    files = read_labelled(source, info, parse_label_map(data.label_map), str(source), limit=TRAIN_LIMIT)
    return prepare_training_images(files, info, data.size, info.n_channels, str(source), data.holdout, copies,
                                   seed, cache_dir or default_cache_dir(), progress, data.label_map)


def held_out_framings(images: TrainingImages, info: DatasetInfo, size: int, channels: int, label_map: str = "",
                      framing=None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The held-out images of a prepared folder in each of
    :data:`engine.learn.augment.UPLOAD_FRAMINGS`, each put through the upload path (with the
    model's squeeze estimator ``framing``, as an upload is): ``{framing: (uint8 images, labels)}``.
    Empty when the folder is no longer where it was read or holds out nothing."""
    from .augment import UPLOAD_FRAMINGS, reframe
    from .images import ImageError, _to_channels, decode, to_model_input

    source = Path(images.source)
    if not len(images.holdout_index) or not source.exists():
        return {}
    held = {images.names[i]: int(images.labels[i]) for i in images.holdout_index}
    originals, labels = [], []
    for f in read_labelled(source, info, parse_label_map(label_map), str(source), limit=TRAIN_LIMIT):
        if f.name in held and f.data is not None:
            try:
                originals.append(_to_channels(decode(f.data, f.name), channels, []))
            except ImageError:
                continue
            labels.append(held[f.name])
    y = np.asarray(labels, dtype=np.int64)
    return {kind: (np.stack([to_model_input(reframe(o, share, stretch), size, channels, framing=framing)
                             for o in originals]), y)
            for kind, (share, stretch) in UPLOAD_FRAMINGS.items()} if originals else {}
