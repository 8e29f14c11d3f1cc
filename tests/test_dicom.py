"""DICOM uploads as a radiology department exports them, written here with pydicom from a real
chest X-ray: 16-bit, MONOCHROME1, a VOI window, multi-frame, no pixel data, an undecodable
compression; and only pixels leave the file."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, SecondaryCaptureImageStorage, generate_uid

from conftest import REPO
from engine.learn import screening
from engine.learn.images import ImageError, load_image
from engine.config import SHARED_DATA

PATIENT = "Doe^Jane"
PATIENT_ID = "PID-314159"
INSTITUTION = "St Example Hospital"


def xray() -> np.ndarray:
    """A real chest X-ray (the real-image folder's first one, else a shipped sample), 8-bit grey
    spanning 0..255 (without a window, a DICOM's values are mapped by their own range, as a
    viewer's auto-window does)."""
    real = sorted((SHARED_DATA / "real" / "chest_xray_224" / "NORMAL").glob("*.jpeg"))
    if real:
        a = np.asarray(Image.open(real[0]).convert("L")).astype(np.float64)
    else:
        from engine.learn.data import load_samples

        a = load_samples("pneumoniamnist").images[0].astype(np.float64)
    return np.round((a - a.min()) / (a.max() - a.min()) * 255).astype(np.uint8)


def dicom(pixels: np.ndarray | None, photometric: str = "MONOCHROME2", bits: int = 12, **fields) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.InstitutionName = PATIENT, PATIENT_ID, INSTITUTION
    ds.Modality = "CR"
    if pixels is not None:
        ds.set_pixel_data(pixels, photometric, bits)
    for k, v in fields.items():
        setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def twelve_bit(a8: np.ndarray) -> np.ndarray:
    return (a8.astype(np.int64) * 4095 // 255).astype(np.uint16)


def close(a: np.ndarray, b: np.ndarray, tol: float = 2.0) -> bool:
    return float(np.abs(a.astype(float) - b.astype(float)).mean()) <= tol


def test_16bit_and_monochrome1_decode_to_the_same_picture_as_the_png():
    gray = xray()
    reference = load_image(_png(gray), 28, 1, name="x.png").array
    mono2 = load_image(dicom(twelve_bit(gray)), 28, 1, name="x.dcm")
    assert mono2.array.shape == (28, 28) and close(mono2.array, reference)
    mono1 = load_image(dicom((4095 - twelve_bit(gray)).astype(np.uint16), "MONOCHROME1"), 28, 1, name="x.dcm")
    assert any("MONOCHROME1" in n and "inverted" in n for n in mono1.notes)
    assert close(mono1.array, reference)
    # 16 bits stored: the full range maps to 0..255 as well
    sixteen = load_image(dicom((gray.astype(np.int64) * 257).astype(np.uint16), bits=16), 28, 1, name="no-extension")
    assert close(sixteen.array, reference)


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def test_the_files_window_is_applied():
    gray = twelve_bit(xray())
    lo, hi = np.percentile(gray, [30, 70])
    out = load_image(dicom(gray, WindowCenter=float((lo + hi) / 2), WindowWidth=float(hi - lo)), 224, 1, name="w.dcm")
    assert "DICOM: applied the file's window" in out.notes
    # below the window is black, above it white: the window, not the file's own range, sets the grey levels
    assert (out.original[gray < lo - 1] <= 1).all() and (out.original[gray > hi + 1] >= 254).all()


def test_multiframe_uses_the_first_frame():
    gray = twelve_bit(xray())
    frames = np.stack([gray, np.zeros_like(gray)])
    out = load_image(dicom(frames), 28, 1, name="cine.dcm")
    assert any("2 frames: used the first frame" in n for n in out.notes)
    assert close(out.array, load_image(dicom(gray), 28, 1, name="one.dcm").array, 0.5)


def test_no_pixel_data_and_undecodable_compression_are_clear_errors():
    with pytest.raises(ImageError, match="without pixel data"):
        load_image(dicom(None), 28, 1, name="report.dcm")
    ds_bytes = dicom(twelve_bit(xray()))
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(ds_bytes))
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51 not a real codestream"])
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(ImageError, match="JPEG 2000.*could not be decoded"):
        load_image(buf.getvalue(), 28, 1, name="j2k.dcm")
    with pytest.raises(ImageError, match="not a readable DICOM"):
        load_image(b"\0" * 128 + b"DICM" + b"garbage", 28, 1, name="broken.dcm")


def test_only_pixels_leave_the_file(tmp_path):
    """No header field reaches the decoded image, its notes, the screening rows or the CLI output."""
    raw = dicom(twelve_bit(xray()), "MONOCHROME2", WindowCenter=2000.0, WindowWidth=3000.0)
    loaded = load_image(raw, 28, 1, name="scan.dcm")
    items = screening.screen([("scan.dcm", raw)], None, 28, 1)
    text = repr(loaded.notes) + repr(items[0].notes) + repr(items[0].error)
    for secret in (PATIENT, "Doe", PATIENT_ID, INSTITUTION):
        assert secret not in text
    assert isinstance(loaded.array, np.ndarray) and loaded.array.dtype == np.uint8
    path = Path(tmp_path) / "scan.dcm"
    path.write_bytes(raw)
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "engine", "predict", "--dataset", "pneumoniamnist", "--models-dir",
                        str(REPO / "models"), "--modes", "float", "--image", str(path)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-1500:]
    assert "scan.dcm" in p.stdout and "confidence" in p.stdout
    for secret in (PATIENT, "Doe", PATIENT_ID, INSTITUTION):
        assert secret not in p.stdout + p.stderr


def _pydicom_test_files() -> list[Path]:
    import pydicom

    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    return sorted(folder.rglob("*.dcm"))


def test_every_dicom_test_file_of_pydicom_decodes_or_is_a_clear_image_error():
    """pydicom's own real test files (78 or more: CT, MR, CR, RT, reports, malformed headers,
    every compression): each decodes to the model's input or raises ImageError, nothing else."""
    from pydicom.uid import (JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1,
                             JPEGLSLossless, JPEGLSNearLossless, RLELossless)
    import pydicom

    files = _pydicom_test_files()
    assert len(files) >= 70
    decoded, refused, syntaxes = [], {}, set()
    for path in files:
        try:
            out = load_image(path.read_bytes(), 28, 1, name=path.name)
        except ImageError as exc:
            refused[path.name] = str(exc)
            continue
        assert out.array.shape == (28, 28) and out.array.dtype == np.uint8
        decoded.append(path.name)
        syntaxes.add(pydicom.dcmread(path, stop_before_pixels=True).file_meta.get("TransferSyntaxUID"))
    # the compressions radiology departments export decode (pydicom's pylibjpeg plugins)
    for uid in (JPEGLosslessSV1, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSLossless, JPEGLSNearLossless,
                JPEG2000Lossless, JPEG2000, RLELossless):
        assert uid in syntaxes, f"no {uid.name} file decoded"
    for name in ("examples_jpeg2k.dcm", "JPGExtended.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm",
                 "SC_rgb_jpeg.dcm", "MR_small_jp2klossless.dcm"):
        assert name in decoded, refused.get(name)
    # malformed headers are clear errors too
    assert "malformed DICOM" in refused["badVR.dcm"]
    assert len(decoded) >= 55


def test_colour_dicom_decodes_to_the_same_colours_whatever_the_encoding():
    """RGB, YCbCr 4:2:2 and JPEG-compressed copies of one picture decode alike (YCbCr is converted once)."""
    folder = Path(_pydicom_test_files()[0]).parent
    ref = load_image((folder / "SC_rgb_dcmtk_+eb+cr.dcm").read_bytes(), 100, 3, name="rgb.dcm").original
    for name in ("SC_rgb_dcmtk_+eb+cy+np.dcm", "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_jpeg_dcmtk.dcm"):
        other = load_image((folder / name).read_bytes(), 100, 3, name=name).original
        assert close(other, ref, 4.0), name
