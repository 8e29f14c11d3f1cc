"""Uploads squeezed sideways are reframed before the model sees them: the squeeze estimator
(numpy forward equal to torch's), the shipped one on real X-rays and MedMNIST images, and the CLI."""

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, real_data_dir
from engine.learn import framing, registry
from engine.learn.data import DataConfig, load_split
from engine.learn.images import load_image

CHEST = real_data_dir().parent / "real" / "chest_xray_224"  # ../shared/data/real, beside the MedMNIST files


@pytest.fixture(scope="module")
def shipped():
    # the model that learned from MedMNIST's crops only ships the estimator (one trained with
    # real uploads needs none)
    found = [framing.Framing.load(m.path) for m in registry.list_models("pneumoniamnist", REPO / "models")]
    found = [fr for fr in found if fr is not None]
    assert found, "a shipped PneumoniaMNIST model ships its framing.npz"
    return found[0]


def _png(arr: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "PNG")
    return b.getvalue()


def test_numpy_forward_is_torch_forward_and_survives_a_round_trip(data_dir, tmp_path):
    import torch
    from torch import nn

    train = load_split(DataConfig("pneumoniamnist", data_dir=str(data_dir), allow_download=False), "train").images[:500]
    fr = framing.fit(train, seeds=(0,), epochs=1, per_epoch=512)
    fr.save(tmp_path)
    again = framing.Framing.load(tmp_path)
    p = again.nets[0]
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(32 * 7 * 3, 64), nn.ReLU(), nn.Linear(64, 1))
    layers = [m for m in net if isinstance(m, (nn.Conv2d, nn.Linear))]
    for name, m in zip(framing.LAYERS, layers):
        m.weight.data = torch.from_numpy(p[f"{name}.w"])
        m.bias.data = torch.from_numpy(p[f"{name}.b"])
    bands, _ = framing.synthetic_bands(train, 8, np.random.default_rng(1))
    with torch.no_grad():
        want = net(torch.from_numpy(bands[:, None])).squeeze(1).numpy()
    got = np.array([framing._forward(p, b) for b in bands])
    assert np.allclose(got, want, atol=1e-4)
    assert again.scale == fr.scale and again.threshold == fr.threshold


def test_shipped_estimator_tells_squeezed_x_rays_from_medmnist_framing(shipped, data_dir):
    real = sorted((CHEST / "NORMAL").glob("*"))[:12] + sorted((CHEST / "PNEUMONIA").glob("*"))[:12]
    squeezed = [shipped.estimate(np.asarray(Image.open(f).convert("L"))) for f in real]
    test = load_split(DataConfig("pneumoniamnist", data_dir=str(data_dir), allow_download=False), "test").images[:60]
    framed = [shipped.estimate(x) for x in test]
    assert np.median(squeezed) < 0.8 < 0.95 < np.median(framed)
    # The same X-ray stretched back to twice the width reads as much less squeezed.
    x = np.asarray(Image.open(real[0]).convert("L"))
    wide = np.asarray(Image.fromarray(x).resize((448, 224), Image.Resampling.LANCZOS))[:, 112:336]
    assert shipped.estimate(wide) > squeezed[0] + 0.2


def test_upload_path_reframes_a_squeezed_x_ray_and_leaves_medmnist_images_alone(shipped, data_dir):
    xray = (sorted((CHEST / "PNEUMONIA").glob("*"))[0]).read_bytes()
    plain = load_image(xray, 28, 1)
    reframed = load_image(xray, 28, 1, framing=shipped)
    note = [n for n in reframed.notes if "squeezed sideways" in n]
    assert note and "kept the central" in note[0]
    assert reframed.array.shape == plain.array.shape == (28, 28) and not np.array_equal(reframed.array, plain.array)
    test = load_split(DataConfig("pneumoniamnist", data_dir=str(data_dir), allow_download=False), "test").images[:40]
    same = [np.array_equal(load_image(_png(x), 28, 1, framing=shipped).array, x) for x in test]
    assert np.mean(same) >= 0.85  # MedMNIST's own framing stays as it is (a few read as squeezed)


def test_framing_command_fits_and_removes_the_estimator(tiny_saved, models_dir, data_dir):
    run = [sys.executable, "-m", "engine", "framing", "--dataset", "pneumoniamnist", "--model", tiny_saved.name,
           "--models-dir", str(models_dir), "--data-dir", str(data_dir), "--seeds", "1", "--epochs", "1", "--samples", "2000"]
    out = subprocess.run(run, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tiny_saved.path / framing.FRAMING_FILE).exists() and "would be reframed" in out.stdout
    out = subprocess.run(run + ["--remove"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0 and not (tiny_saved.path / framing.FRAMING_FILE).exists()
