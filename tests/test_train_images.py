"""Training from labelled images through the upload path (train --images): real X-rays from
../shared/data/real/chest_xray_train, a tiny model, the folder and the zip, the CLI and the Train page."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from dataclasses import replace

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from conftest import REPO, real_data_dir, tiny_config
from engine.learn import registry
from engine.learn.augment import real_upload
from engine.learn.data import dataset_info
from engine.learn.labelled import LabelError, stratified_holdout, training_images
from engine.learn.train import train

REAL = real_data_dir().parent / "real" / "chest_xray_train"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """12 normal and 12 pneumonia X-rays in class folders named as the Kermany set names them, and one broken file."""
    root = tmp_path_factory.mktemp("labelled") / "xrays"
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True)
        for f in sorted((REAL / cls).glob("*.jpeg"))[:12]:
            (root / cls / f.name).write_bytes(f.read_bytes())
    (root / "PNEUMONIA" / "broken.png").write_bytes(b"\x89PNG not really")
    return root


@pytest.fixture(scope="module")
def archive(folder, tmp_path_factory):
    path = tmp_path_factory.mktemp("zip") / "xrays.zip"
    with zipfile.ZipFile(path, "w") as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, f"xrays/{f.relative_to(folder).as_posix()}")
    return path


def test_real_upload_versions_vary_framing_and_keep_the_kind_of_image():
    x = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(sorted((REAL / "NORMAL").glob("*.jpeg"))[0]).convert("L"))
    rng = np.random.default_rng(0)
    outs = [real_upload(x, rng) for _ in range(40)]
    shapes = {o.shape for o in outs}
    assert len(shapes) > 20 and all(o.dtype == np.uint8 and o.ndim == 2 for o in outs)
    aspects = [o.shape[1] / o.shape[0] for o in outs]
    assert min(aspects) < 0.85 and max(aspects) > 1.15  # squeezed and stretched
    assert all(0.2 * x.shape[0] <= o.shape[0] <= 1.8 * x.shape[0] for o in outs)  # an earlier resize, framing, margins


def test_holdout_is_stratified():
    labels = np.array([0] * 30 + [1] * 90)
    mask = stratified_holdout(labels, 0.1, 0)
    assert mask[:30].sum() == 3 and mask[30:].sum() == 9
    assert not stratified_holdout(labels, 0.0).any()
    assert stratified_holdout(np.array([0, 1, 1]), 0.5).tolist().count(True) == 1  # a lone image is never held out


def test_training_with_images_holds_out_part_and_records_what_it_learned_from(folder, data_dir, tmp_path):
    cfg = tiny_config(data_dir, limit_train=256, image_copies=2)
    cfg = cfg.replace(data=replace(cfg.data, images=str(folder), holdout=0.25))
    info = dataset_info("pneumoniamnist")
    images = training_images(cfg.data, info, 2, 0, cache_dir=tmp_path / "cache")
    assert len(images.names) == 24 and [n for n, _ in images.unreadable] == ["PNEUMONIA/broken.png"]
    assert images.copies.shape == (2, 24, 28, 28) and images.clean.shape == (24, 28, 28)
    assert images.counts(info, "holdout") == {"normal": 3, "pneumonia": 3}
    # the prepared set is cached by content: the second read decodes nothing and gives the same arrays
    again = training_images(cfg.data, info, 2, 0, cache_dir=tmp_path / "cache")
    assert np.array_equal(again.copies, images.copies) and again.content_hash == images.content_hash

    seen = []
    result = train(cfg, progress=seen.append, images=images)
    assert result.metrics["holdout"]["n"] == 6 and all(r.holdout_accuracy is not None for r in seen)
    saved = registry.save(result, "with-images", tmp_path / "models")
    meta = json.loads((saved.path / "model.json").read_text())
    kinds = [s["kind"] for s in meta["sources"]]
    assert kinds == ["medmnist", "images"]
    own = meta["sources"][1]
    assert own["sha256"] == images.content_hash and own["train"] == {"normal": 9, "pneumonia": 9}
    assert own["holdout"] == {"normal": 3, "pneumonia": 3} and own["unreadable"] == 1
    assert meta["config"]["data"]["images"] == "xrays"  # no machine path in the registry
    assert "labelled images 'xrays': 18 trained on" in saved.sources_text()
    # the compiler's input set, stored with the model, holds MedMNIST's images only: none of the folder's
    assert len(result.calibration) == 256
    own_images = {im.tobytes() for im in images.clean}
    assert not any(im.tobytes() in own_images for im in result.calibration)


def test_images_only_trains_on_the_folder_alone(folder, data_dir, tmp_path):
    cfg = tiny_config(data_dir, image_copies=1)
    cfg = cfg.replace(data=replace(cfg.data, images=str(folder), images_only=True))
    images = training_images(cfg.data, dataset_info("pneumoniamnist"), 1, 0, cache_dir=tmp_path)
    result = train(cfg, images=images)
    assert [s["kind"] for s in result.sources] == ["images"] and len(result.calibration) == len(images.train_index)


def test_a_folder_without_class_folders_is_a_clear_error(tmp_path, data_dir):
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "a.png").write_bytes(b"x")
    cfg = replace(tiny_config(data_dir).data, images=str(tmp_path / "loose"))
    with pytest.raises(LabelError, match="no class folders"):
        training_images(cfg, dataset_info("pneumoniamnist"), 1, 0, cache_dir=tmp_path)


def test_cli_trains_from_a_zip_with_a_label_map(archive, data_dir, tmp_path):
    run = [sys.executable, "-m", "engine", "train", "--dataset", "pneumoniamnist", "--data-dir", str(data_dir),
           "--models-dir", str(tmp_path), "--images", str(archive), "--label-map", "NORMAL=0,PNEUMONIA=1",
           "--hidden", "4", "--input-pool", "3", "--epochs", "1", "--limit-train", "128", "--image-copies", "1",
           "--name", "cli-images", "--no-circuit-check"]
    out = subprocess.run(run, capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**__import__("os").environ, "ENGINE_CACHE_DIR": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "learned from: MedMNIST pneumoniamnist train split: 128 images" in out.stdout
    assert "labelled images 'xrays.zip'" in out.stdout and "held-out images accuracy" in out.stdout
    assert "unreadable: PNEUMONIA/broken.png" in out.stderr
    bad = subprocess.run(run[:-1] + ["--images-only", "--images", str(tmp_path / "missing")], capture_output=True,
                         text=True, cwd=REPO, timeout=300)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_train_page_trains_with_my_labelled_images(archive, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MEDMNIST_DIR", str(data_dir))
    monkeypatch.chdir(REPO)
    at = AppTest.from_file(str(REPO / "dashboard/views/1_Train.py"), default_timeout=300).run()
    at.selectbox(key="train_dataset").set_value("pneumoniamnist").run()
    at.radio(key="train_source").set_value("MedMNIST + my labelled images (.zip)").run()
    assert not at.exception
    at.file_uploader(key="train_zip").set_value(("xrays.zip", archive.read_bytes(), "application/zip"))
    at.text_input(key="train_hidden").set_value("4")
    at.number_input(key="train_epochs").set_value(1)
    at.number_input(key="train_limit").set_value(128)
    at.text_input(key="train_name").set_value("ui-images")
    at.button[0].click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert any("Saved **pneumoniamnist/ui-images**" in s.value and "held-out images" in s.value for s in at.success)
    assert any("labelled images 'xrays.zip" in c.value for c in at.caption)
    saved = registry.load("pneumoniamnist", "ui-images", tmp_path / "models")
    assert [s["kind"] for s in saved.sources] == ["medmnist", "images"]


def test_fractional_pooling_averages_the_whole_image_by_area():
    from engine.config import ModelConfig
    from engine.learn.data import area_matrix, to_features

    x = np.random.default_rng(0).integers(0, 256, (3, 28, 28)).astype(np.uint8)
    f = to_features(x, 2.8)
    assert f.shape == (3, 100) and to_features(x, 2).shape == (3, 196) and to_features(x, 3).shape == (3, 81)
    # each input is the area-weighted mean of its span: a constant image stays constant, and the
    # mean over all inputs is the image's mean (every pixel counts the same)
    flat = np.full((1, 28, 28), 200, np.uint8)
    assert np.allclose(to_features(flat, 2.8), 200 / 127.5 - 1)
    assert np.allclose(f.mean(axis=1), x.reshape(3, -1).astype(np.float32).mean(axis=1) / 127.5 - 1, atol=1e-5)
    m = area_matrix(28, 10)
    assert np.allclose(m.sum(axis=1), 1) and np.allclose(m.sum(axis=0), 10 / 28)
    assert ModelConfig(input_pool=2.0).input_pool == 2 and isinstance(ModelConfig(input_pool=2.0).input_pool, int)
    with pytest.raises(ValueError):
        ModelConfig(input_pool=0.5)
