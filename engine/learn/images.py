"""An uploaded image -> the model's input (uint8, dataset size, 1 or 3 channels).

Conversions, each reported in ``LoadedImage.notes``:
- palette, CMYK, grayscale+alpha, RGBA: converted; alpha is composited onto black (the
  background of MedMNIST scans);
- 16-bit or float data: rescaled to 0..255 by its own min and max;
- animated GIF/TIFF/APNG: the first frame is used;
- non-square: center-cropped to a square (as MedMNIST did), then resized (Lanczos);
- squeezed sideways (a copy resized to a square without keeping the aspect ratio), when the
  model ships a squeeze estimator (``framing``, :mod:`engine.learn.framing`): the central share
  of the width that undoes the squeeze is kept and stretched back to a square;
- shrunk to the model's size from a sharper original: softened, with the least Gaussian blur
  that brings its graininess down to the training images' median (``sharpness``; MedMNIST's
  images are smoother than a sharp scan resized with Lanczos, and the model answers them best);
- RGB for a grayscale dataset: luminance; grayscale for an RGB dataset: replicated;
- DICOM (read with pydicom; compressed files with its pylibjpeg plugins): the modality rescale and the file's VOI LUT or window applied,
  MONOCHROME1 inverted, 12- or 16-bit values mapped to 0..255, the first frame of a multi-frame
  file. Only pixels leave the file: no header field (patient, study, institution) is kept,
  noted or returned.
Oversized, truncated, empty and non-image files raise :class:`ImageError`.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

MAX_BYTES = 25 * 1024 * 1024
MAX_PIXELS = 40_000_000
FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "GIF", "MPO")
EXTENSIONS = ("png", "jpg", "jpeg", "bmp", "tif", "tiff", "gif", "npy", "dcm", "dicom")


class Reframer(Protocol):
    """What the upload path needs of a squeeze estimator (:class:`engine.learn.framing.Framing`):
    typed here without importing it (framing reads the registry, which reads training)."""

    def reframe(self, square: np.ndarray) -> tuple[np.ndarray, float | None]: ...


class ImageError(Exception):
    """The file is not an image the model can use; the message says why and what to do."""


@dataclass
class LoadedImage:
    array: np.ndarray  # (size, size) or (size, size, 3), uint8: what the model sees
    original: np.ndarray  # the decoded image before crop/resize (uint8), for display
    notes: list[str] = field(default_factory=list)


def load_image(source: Path | bytes, size: int = 28, channels: int = 1, name: str | None = None,
               sharpness: float | None = None, framing: "Reframer | None" = None) -> LoadedImage:
    """Decode ``source`` (a path or the uploaded bytes) into the model's input format.

    ``sharpness``: the training images' median :func:`graininess`; an image shrunk to the model's
    size that is grainier than that is softened to it (None: never). ``framing``: the model's
    squeeze estimator (:mod:`engine.learn.framing`); a square that looks squeezed sideways keeps
    the central share of its width that undoes it (None: never)."""
    notes: list[str] = []
    original = decode(source, name, notes)
    return LoadedImage(array=to_model_input(original, size, channels, notes, sharpness, framing),
                       original=original, notes=notes)


def decode(source: Path | bytes, name: str | None = None, notes: list[str] | None = None) -> np.ndarray:
    """The decoded image at full size (uint8, H x W or H x W x 3): the first half of the upload
    path. Conversions are appended to ``notes``."""
    notes = [] if notes is None else notes
    if isinstance(source, (str, Path)):
        name = name or Path(source).name
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise ImageError(f"Cannot read {source}: {exc.strerror or exc}") from None
    else:
        data = bytes(source)
    name = name or "upload"
    if not data:
        raise ImageError(f"{name} is empty.")
    if len(data) > MAX_BYTES:
        raise ImageError(f"{name} is {len(data) / 1e6:.0f} MB; the limit is {MAX_BYTES // 2**20} MB. Downscale it first.")
    if name.lower().endswith(".npy") or data[:6] == b"\x93NUMPY":
        return _from_npy(data, name, notes)
    if data[128:132] == b"DICM" or name.lower().endswith((".dcm", ".dicom")):
        return _from_dicom(data, name, notes)
    return _from_pil(data, name, notes)


def to_model_input(original: np.ndarray, size: int = 28, channels: int = 1, notes: list[str] | None = None,
                   sharpness: float | None = None, framing: "Reframer | None" = None) -> np.ndarray:
    """A decoded image (uint8, any size) -> what the model sees: the second half of the upload
    path (channels, centre crop to a square, resize). Training images take it too."""
    notes = [] if notes is None else notes
    arr = _to_channels(np.asarray(original, dtype=np.uint8), channels, notes)
    return _square_resize(arr, size, notes, sharpness, framing)


def graininess(images) -> np.ndarray:
    """Mean absolute difference between neighbouring pixels (grey, [0, 1]) of each image: noise
    scores about 0.33, MedMNIST's scans about 0.04."""
    out = []
    for im in images:
        g = np.asarray(im, dtype=np.float32) / 255.0
        if g.ndim == 3:
            g = g[..., :3].mean(axis=2)
        if min(g.shape) < 2:
            out.append(0.0)
            continue
        out.append(float((np.abs(np.diff(g, axis=0)).mean() + np.abs(np.diff(g, axis=1)).mean()) / 2))
    return np.asarray(out)


SOFTEN_SIGMAS = tuple(round(0.1 * i, 1) for i in range(1, 21))  # Gaussian blur, in model pixels


def _soften(square: np.ndarray, size: int, target: float) -> tuple[np.ndarray, float]:
    """The least blur (at 4x the model's size) whose result, shrunk to ``size``, is no grainier
    than ``target``; (image, sigma in model pixels)."""
    mid = min(square.shape[0], 4 * size)
    base = Image.fromarray(square)
    if square.shape[0] > mid:
        base = base.resize((mid, mid), Image.Resampling.LANCZOS)
    out = None
    for sigma in SOFTEN_SIGMAS:
        out = np.asarray(base.filter(ImageFilter.GaussianBlur(sigma * mid / size)).resize((size, size), Image.Resampling.LANCZOS))
        if graininess([out])[0] <= target:
            break
    return out, sigma


def _from_npy(data: bytes, name: str, notes: list[str]) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise ImageError(f"{name} is not a readable .npy array ({type(exc).__name__}).") from None
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.moveaxis(arr, 0, -1)  # channels-first -> channels-last
        notes.append("moved the channel axis last")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3) or min(arr.shape[:2]) < 1:
        raise ImageError(f"{name} has shape {arr.shape}; expected (H, W), (H, W, 3) or (3, H, W).")
    if arr.shape[0] * arr.shape[1] > MAX_PIXELS:
        raise ImageError(f"{name} is {arr.shape[1]}x{arr.shape[0]} pixels; the limit is {MAX_PIXELS:,}.")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ImageError(f"{name} holds {arr.dtype} values, not numbers.")
    return _to_uint8(arr.astype(np.float64) if arr.dtype == bool else arr, notes)


def _from_dicom(data: bytes, name: str, notes: list[str]) -> np.ndarray:
    """The pixels of a DICOM file as a radiologist's viewer shows them; nothing else. Anything
    pydicom or its decoders raise on a malformed file ends as an :class:`ImageError`."""
    try:
        return _dicom_pixels(data, name, notes)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed header value (badVR.dcm: IS '1A') raises anything
        raise ImageError(f"{name} is a malformed DICOM file ({type(exc).__name__}: {str(exc)[:120]}).") from None


# Compressed transfer syntaxes decode with pydicom's pylibjpeg plugins (JPEG baseline, extended
# and lossless, JPEG-LS, JPEG 2000) and RLE; pixel_array returns YCbCr as RGB (pydicom 3's default).
def _dicom_pixels(data: bytes, name: str, notes: list[str]) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=name.lower().endswith((".dcm", ".dicom")))
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, AttributeError):
        raise ImageError(f"{name} is not a readable DICOM file.") from None
    if not len(ds):
        raise ImageError(f"{name} is not a readable DICOM file.")
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageError(f"{name} is a DICOM file without pixel data (a report or structured document?): "
                         "export the image itself.")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises several kinds for undecodable pixel data
        if syntax is not None and syntax.is_compressed:
            raise ImageError(f"{name}: the DICOM pixel data is compressed as {syntax.name} and could not be decoded "
                             f"({type(exc).__name__}: the data is damaged or uses a variant no decoder here reads). "
                             "Export it uncompressed (Explicit VR Little Endian) or as PNG.") from None
        raise ImageError(f"{name}: the DICOM pixel data does not match its header (truncated or damaged: "
                         f"{type(exc).__name__}). Export the image again.") from None
    if syntax is not None and syntax.is_compressed:
        notes.append(f"DICOM compressed as {syntax.name}: decoded")
    if frames > 1:
        arr = arr[0]
        notes.append(f"DICOM with {frames} frames: used the first frame")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric.startswith("MONOCHROME"):
        arr = apply_modality_lut(arr, ds)
        windowed = "VOILUTSequence" in ds or "WindowCenter" in ds
        if windowed:
            arr = apply_voi_lut(arr, ds)
            notes.append("DICOM: applied the file's VOI LUT" if "VOILUTSequence" in ds else "DICOM: applied the file's window")
        arr = _to_uint8(np.asarray(arr, dtype=np.float64), notes)
        if photometric == "MONOCHROME1":
            arr = 255 - arr
            notes.append("DICOM MONOCHROME1 (white is low): inverted")
        return arr
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        notes.append("DICOM palette colours: applied the file's colour table")
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ImageError(f"{name}: DICOM {photometric} images are not supported; export it as PNG.")
    return _to_uint8(arr, notes)


def _to_uint8(arr: np.ndarray, notes: list[str]) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    a = arr.astype(np.float64)
    if not np.isfinite(a).all():
        raise ImageError("The image contains NaN or infinite values.")
    lo, hi = float(a.min()), float(a.max())
    notes.append(f"rescaled {arr.dtype} values [{lo:g}, {hi:g}] to 0..255")
    if hi == lo:
        return np.zeros(a.shape, np.uint8)
    return np.round((a - lo) / (hi - lo) * 255).astype(np.uint8)


def _from_pil(data: bytes, name: str, notes: list[str]) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check the size ourselves
            img = Image.open(io.BytesIO(data))
        fmt = img.format
        if img.width * img.height > MAX_PIXELS:
            raise ImageError(f"{name} is {img.width}x{img.height} pixels; the limit is {MAX_PIXELS:,}. Downscale it first.")
        if fmt not in FORMATS:
            raise ImageError(f"{name} is a {fmt} image; use PNG, JPEG, BMP, TIFF, DICOM or .npy.")
        if getattr(img, "n_frames", 1) > 1:
            notes.append(f"animated/multi-page ({img.n_frames} frames): used the first frame")
            img.seek(0)
        img.load()
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"{name} has more than {MAX_PIXELS:,} pixels. Downscale it first.") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name} is not an image (use PNG, JPEG, BMP, TIFF, DICOM or .npy).") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name} is truncated or corrupt ({exc}).") from None
    img = ImageOps.exif_transpose(img) or img
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _to_uint8(np.asarray(img), notes)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        notes.append("converted palette colours")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
        notes.append(f"converted {mode} to RGB")
    elif mode == "1":
        img = img.convert("L")
    if img.mode in ("RGBA", "LA", "PA"):
        notes.append("composited transparency onto black")
        bg = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(bg, img.convert("RGBA")).convert("RGB" if img.mode == "RGBA" else "L")
    return np.asarray(img.convert("RGB") if img.mode not in ("L", "RGB") else img)


def _to_channels(arr: np.ndarray, channels: int, notes: list[str]) -> np.ndarray:
    if channels == 1 and arr.ndim == 3:
        notes.append("converted colour to grayscale")
        return np.asarray(Image.fromarray(arr).convert("L"))
    if channels == 3 and arr.ndim == 2:
        notes.append("replicated grayscale into 3 channels")
        return np.repeat(arr[..., None], 3, axis=2)
    return arr


def _square_resize(arr: np.ndarray, size: int, notes: list[str], sharpness: float | None = None,
                   framing: "Reframer | None" = None) -> np.ndarray:
    h, w = arr.shape[:2]
    if h != w:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        arr = arr[top : top + s, left : left + s]
        notes.append(f"center-cropped {w}x{h} to {s}x{s}")
    if framing is not None:
        arr, keep = framing.reframe(arr)
        if keep is not None:
            notes.append(f"looks squeezed sideways: kept the central {keep:.0%} of the width and stretched it back "
                         f"(MedMNIST's framing)")
    if arr.shape[0] != size:
        notes.append(f"resized {arr.shape[0]}x{arr.shape[0]} to {size}x{size}")
        square, arr = arr, np.asarray(Image.fromarray(arr).resize((size, size), Image.Resampling.LANCZOS))
        if sharpness is not None and square.shape[0] > size and graininess([arr])[0] > sharpness:
            arr, sigma = _soften(square, size, sharpness)
            notes.append(f"softened to the training images' sharpness (Gaussian blur of {sigma:g} px at {size}x{size})")
    return np.ascontiguousarray(arr, dtype=np.uint8)


MAX_ARCHIVE_FILES = 500


def expand_uploads(files: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Uploaded files, with every ``.zip`` replaced by its image members (``archive.zip/member``).

    Members that are not images by extension, folders and macOS resource forks are skipped; an
    archive may hold at most :data:`MAX_ARCHIVE_FILES` images and :data:`MAX_BYTES` per image.
    """
    import io
    import zipfile

    out: list[tuple[str, bytes]] = []
    for name, data in files:
        if not name.lower().endswith(".zip"):
            out.append((name, data))
            continue
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except zipfile.BadZipFile:
            raise ImageError(f"{name} is not a readable zip archive.") from None
        members = [m for m in archive.infolist() if not m.is_dir() and "__MACOSX" not in m.filename
                   and m.filename.rsplit(".", 1)[-1].lower() in EXTENSIONS]
        if not members:
            raise ImageError(f"{name} holds no image ({', '.join(EXTENSIONS)}).")
        if len(members) > MAX_ARCHIVE_FILES:
            raise ImageError(f"{name} holds {len(members)} images; the limit is {MAX_ARCHIVE_FILES}. Split it.")
        for m in members:
            if m.file_size > MAX_BYTES:
                raise ImageError(f"{name}/{m.filename} is {m.file_size / 1e6:.0f} MB; the limit is {MAX_BYTES // 2**20} MB.")
            out.append((f"{name}/{m.filename}", archive.read(m)))
    return out
