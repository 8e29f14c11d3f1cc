import io

import numpy as np
import pytest
from PIL import Image

from engine.learn.images import ImageError, load_image


def png(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_gray_png_resized_and_cropped():
    img = Image.fromarray(np.tile(np.arange(200, dtype=np.uint8), (100, 1)))  # 200x100
    out = load_image(png(img), 28, 1)
    assert out.array.shape == (28, 28) and out.array.dtype == np.uint8
    assert any("center-cropped 200x100" in n for n in out.notes)


def test_rgb_jpeg_to_gray_and_gray_to_rgb():
    rgb = Image.fromarray(np.full((64, 64, 3), (200, 10, 10), np.uint8))
    assert load_image(png(rgb, "JPEG"), 28, 1).array.shape == (28, 28)
    gray = Image.fromarray(np.full((28, 28), 77, np.uint8))
    out = load_image(png(gray, "BMP"), 28, 3)
    assert out.array.shape == (28, 28, 3) and (out.array == 77).all()


def test_16bit_palette_alpha_animated():
    a16 = Image.fromarray(np.linspace(0, 65535, 28 * 28).reshape(28, 28).astype(np.uint16))
    out = load_image(png(a16), 28, 1)
    assert out.array.min() == 0 and out.array.max() == 255 and any("rescaled" in n for n in out.notes)
    pal = Image.fromarray(np.full((28, 28, 3), 120, np.uint8)).convert("P")
    assert "converted palette colours" in load_image(png(pal), 28, 1).notes
    rgba = Image.fromarray(np.dstack([np.full((28, 28, 3), 255, np.uint8), np.zeros((28, 28), np.uint8)]), "RGBA")
    out = load_image(png(rgba), 28, 1)
    assert (out.array == 0).all() and "composited transparency onto black" in out.notes  # fully transparent -> black
    frames = [Image.fromarray(np.full((28, 28), v, np.uint8)) for v in (10, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = load_image(buf.getvalue(), 28, 1)
    assert any("first frame" in n for n in out.notes) and abs(int(out.array.mean()) - 10) <= 2


def test_tiff_and_npy():
    arr = np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)
    assert np.array_equal(load_image(png(Image.fromarray(arr), "TIFF"), 28, 1).array, arr)
    buf = io.BytesIO()
    np.save(buf, arr.astype(np.float32) / 255)
    out = load_image(buf.getvalue(), 28, 1, name="x.npy")
    assert np.abs(out.array.astype(int) - arr).max() <= 1
    buf = io.BytesIO()
    np.save(buf, np.zeros((3, 28, 28), np.uint8))  # channels-first RGB
    assert load_image(buf.getvalue(), 28, 3, name="c.npy").array.shape == (28, 28, 3)


@pytest.mark.parametrize("data,needle", [
    (b"", "empty"),
    (b"%PDF-1.4 not an image", "not an image"),
    (png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)))[:2000], "truncated or corrupt"),
    (b"\x93NUMPY garbage", "not a readable .npy"),
])
def test_bad_files_give_clear_errors(data, needle):
    with pytest.raises(ImageError, match=needle):
        load_image(data, 28, 1, name="f")


def test_oversized_images_rejected():
    big = Image.new("L", (7000, 7000))
    with pytest.raises(ImageError, match="pixels"):
        load_image(png(big), 28, 1)
    buf = io.BytesIO()
    np.save(buf, np.zeros((4, 28, 28, 5)))
    with pytest.raises(ImageError, match="shape"):
        load_image(buf.getvalue(), 28, 1, name="a.npy")
