"""What happens to a real image on its way to an upload, as a training augmentation.

MedMNIST's images were all made the same way (a centre crop, one resize, PNG). An uploaded
image was not: another scanner's exposure, another resize filter (often more than one, at
other sizes), JPEG compression, blur. :func:`upload_like` applies a random mix of these to
uint8 images so the model learns answers that hold on uploads; framing (squeeze, stretch,
margins) is :func:`random_affine`'s part. :func:`upload_copies` puts both together: the
validation copies on which the input check's thresholds and the confidence's temperature are
fitted, so that they hold on uploads rather than on MedMNIST's own crops only.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageFilter

FILTERS = (Image.Resampling.NEAREST, Image.Resampling.BOX, Image.Resampling.BILINEAR,
           Image.Resampling.BICUBIC, Image.Resampling.LANCZOS)
UP_SIZES = (56, 112, 224)


def photometric(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gamma in [0.7, 1.4], contrast in [0.75, 1.25] about the image's mean and a brightness
    shift of up to 8 grey levels, per image; float in 0..255, same shape."""
    x = np.asarray(x, dtype=np.float32)
    n = len(x)
    shape = (n,) + (1,) * (x.ndim - 1)
    gamma = np.exp(rng.uniform(np.log(0.7), np.log(1.4), n)).reshape(shape)
    y = 255.0 * (x / 255.0) ** gamma
    mean = y.reshape(n, -1).mean(axis=1).reshape(shape)
    y = mean + (y - mean) * rng.uniform(0.75, 1.25, n).reshape(shape) + rng.uniform(-8, 8, n).reshape(shape)
    return np.clip(y, 0, 255)


def resample(image: np.ndarray, rng: np.random.Generator, sharpen: float = 0.0) -> np.ndarray:
    """One image enlarged with one filter, maybe blurred or sharpened and JPEG-compressed at that
    size, then shrunk back with another filter: the round trips an upload went through."""
    h, w = image.shape[:2]
    im = Image.fromarray(image)
    up = int(rng.choice(UP_SIZES))
    im = im.resize((up, up), FILTERS[rng.integers(len(FILTERS))])
    if rng.random() < sharpen:  # edge enhancement, as scanners and viewers apply it
        im = im.filter(ImageFilter.UnsharpMask(float(rng.uniform(0.5, 1.5)) * up / 28, int(rng.integers(50, 200)), 0))
    elif rng.random() < 0.3:
        im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5)) * up / 28))
    if rng.random() < 0.5:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=int(rng.integers(40, 96)))
        im = Image.open(io.BytesIO(buf.getvalue()))
    return np.asarray(im.resize((w, h), FILTERS[1 + rng.integers(len(FILTERS) - 1)]))


def upload_like(images: np.ndarray, rng: np.random.Generator, share: float = 0.5, sharpen: float = 0.0) -> np.ndarray:
    """``share`` of the images (uint8 or float 0..255, N x H x W[ x C]) get
    :func:`photometric` and :func:`resample` (edge-enhanced with probability ``sharpen``);
    float32 0..255, same shape."""
    x = np.asarray(images, dtype=np.float32).copy()
    pick = np.flatnonzero(rng.random(len(x)) < share)
    if not len(pick):
        return x
    x[pick] = photometric(x[pick], rng)
    for i in pick:
        x[i] = resample(np.clip(np.rint(x[i]), 0, 255).astype(np.uint8), rng, sharpen)
    return x


def random_affine(images: np.ndarray, shift: float, rotate: float, scale: float, rng: np.random.Generator,
                  stretch: float = 0.0) -> np.ndarray:
    """Random translation (up to ``shift`` pixels), rotation (up to ``rotate`` degrees) and zoom
    (factor in ``[1 - scale, 1 + scale]``) of each image, edges extended; float32, same shape.

    ``stretch`` > 0 also enlarges one axis (chosen at random) by a factor in ``[1, 1 + stretch]``:
    the view of a narrower crop resized to a square, which invents no margin (what a client's
    crop of an upload squeezed to a square, or framed wider, shows the model)."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32))
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
    n, _, h, w = x.shape
    angle = torch.from_numpy(np.deg2rad(rng.uniform(-rotate, rotate, n))).float()
    zoom = torch.from_numpy(rng.uniform(1 - scale, 1 + scale, n)).float()
    move = torch.from_numpy(rng.uniform(-shift, shift, (n, 2)) * 2 / np.array([w, h])).float()
    # per-axis zoom: (x, y); a stretch of one axis multiplies that axis' zoom
    axes = torch.ones(n, 2)
    if stretch > 0:
        factor = torch.from_numpy(rng.uniform(1, 1 + stretch, n)).float()
        axis = torch.from_numpy(rng.integers(0, 2, n))
        axes[torch.arange(n), axis] = factor
    zx, zy = zoom * axes[:, 0], zoom * axes[:, 1]
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = angle.cos() / zx, -angle.sin() / zy
    theta[:, 1, 0], theta[:, 1, 1] = angle.sin() / zx, angle.cos() / zy
    theta[:, :, 2] = move
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    y = torch.nn.functional.grid_sample(x, grid, padding_mode="border", align_corners=False)
    y = y[:, 0] if np.ndim(images) == 3 else y.permute(0, 2, 3, 1)
    return y.numpy()


# The variation of real uploads that the input check and the confidence are fitted to accept:
# framing (shifts, a tilt, margins in or out, an axis squeezed), then an upload's round trips.
UPLOAD_FRAMING = {"shift": 2, "rotate": 10.0, "scale": 0.2, "stretch": 0.5}


def upload_copies(images: np.ndarray, copies: int = 4, seed: int = 0, sharpen: float = 0.0) -> np.ndarray:
    """``copies`` upload-like versions of each image (uint8, ``copies * N`` images, copy-major);
    ``sharpen``: the share edge-enhanced."""
    rng = np.random.default_rng(seed)
    f = UPLOAD_FRAMING
    out = [upload_like(random_affine(images, f["shift"], f["rotate"], f["scale"], rng, f["stretch"]), rng, 1.0, sharpen)
           for _ in range(copies)]
    return np.clip(np.rint(np.concatenate(out)), 0, 255).astype(np.uint8)


# What real uploads of one scan differ by, applied to the full-size image before the upload
# path brings it to the model's size (train --images): framing (each side keeps 70-100%, or a
# margin is added), one axis squeezed or stretched, a small shift and rotation, exposure and
# gamma, blur, JPEG, and the filter of an earlier resize.
REAL_UPLOAD = {"keep": (0.7, 1.0), "margin": 0.15, "margin_share": 0.2, "aspect": (0.7, 1.4), "rotate": 7.0,
               "blur_share": 0.3, "jpeg_share": 0.5, "resize_share": 0.5}


def real_upload(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random version of a full-size uint8 image (H x W[ x 3]) as another upload of the same
    scan could come (:data:`REAL_UPLOAD`); uint8, any size."""
    f = REAL_UPLOAD
    im = Image.fromarray(np.asarray(image, dtype=np.uint8))
    w, h = im.size
    # an earlier resize with some filter (a copy made elsewhere), and the squeeze of one axis
    factor = float(np.exp(rng.uniform(*np.log(f["aspect"]))))
    shrink = float(rng.uniform(0.35, 1.0)) if rng.random() < f["resize_share"] else 1.0
    sx, sy = (factor, 1.0) if rng.random() < 0.5 else (1.0, factor)
    size = (max(8, round(w * sx * shrink)), max(8, round(h * sy * shrink)))
    if size != (w, h):
        im = im.resize(size, FILTERS[rng.integers(len(FILTERS))])
    w, h = im.size
    # a small rotation, the corners filled dark (the background of a scan)
    angle = float(rng.uniform(-f["rotate"], f["rotate"]))
    if abs(angle) > 0.5:
        im = im.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0 if im.mode == "L" else (0, 0, 0))
    # framing: each side keeps 70-100% at a random place, or a dark margin is added around it
    if rng.random() < f["margin_share"]:
        mx, my = (int(rng.uniform(0, f["margin"]) * s) for s in (w, h))
        canvas = Image.new(im.mode, (w + 2 * mx, h + 2 * my))
        canvas.paste(im, (int(rng.integers(0, 2 * mx + 1)), int(rng.integers(0, 2 * my + 1))))
        im = canvas
    else:
        kw, kh = (max(4, round(s * rng.uniform(*f["keep"]))) for s in (w, h))
        left, top = int(rng.integers(0, w - kw + 1)), int(rng.integers(0, h - kh + 1))
        im = im.crop((left, top, left + kw, top + kh))
    x = photometric(np.asarray(im)[None], rng)[0]
    im = Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))
    if rng.random() < f["blur_share"]:
        im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5)) * max(im.size) / 224))
    if rng.random() < f["jpeg_share"]:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=int(rng.integers(40, 96)))
        im = Image.open(io.BytesIO(buf.getvalue()))
    return np.asarray(im)


# The framings an upload of a real scan comes in, each (share of the width kept by a centre crop,
# horizontal stretch): the image as given, centre crops of its width, stretched back to a
# full-resolution X-ray's natural aspect ratio (the 224 px copies were squeezed from about 1.2-1.5
# wide to square) or squeezed further. The guard calibrates its confidence on held-out real images
# in each framing, and bench/real_confidence.py reports each.
UPLOAD_FRAMINGS = {"as given": (1.0, 1.0), "centre 85%": (0.85, 1.0), "centre 75%": (0.75, 1.0),
                   "natural aspect 1.3x": (1.0, 1.3), "natural aspect 1.5x": (1.0, 1.5), "squeezed 0.8x": (1.0, 0.8)}


def reframe(image: np.ndarray, share: float = 1.0, stretch: float = 1.0) -> np.ndarray:
    """A full-size uint8 image with the centre ``share`` of its width kept (full height), then its
    width resized by ``stretch`` (bicubic): one of :data:`UPLOAD_FRAMINGS`."""
    im = Image.fromarray(np.asarray(image, dtype=np.uint8))
    w, h = im.size
    if share < 1:
        cw = max(1, int(round(share * w)))
        im = im.crop(((w - cw) // 2, 0, (w - cw) // 2 + cw, h))
    if stretch != 1:
        im = im.resize((max(1, int(round(im.size[0] * stretch))), im.size[1]), Image.Resampling.BICUBIC)
    return np.asarray(im)
