import dataclasses

import numpy as np
import pytest
from conftest import make_npz, tiny_config

from engine.learn import registry
from engine.config import ModelConfig
from engine.learn.train import train


def test_tiny_model_learns_pneumonia(tiny_saved):
    m = tiny_saved.metrics
    # Two epochs on 1024 images: clearly better than the majority class (62.5% of test).
    assert m["val"]["accuracy"] > 0.8 and m["test"]["auc"] > 0.85
    assert len(tiny_saved.history) == 2 and m["best_epoch"] in (1, 2)
    assert tiny_saved.in_features == 784 and tiny_saved.n_outputs == 2


def test_training_is_reproducible(data_dir, tmp_path):
    cfg = tiny_config(data_dir, epochs=1, limit_train=256)
    a = registry.save(train(cfg), "a", tmp_path)
    b = registry.save(train(cfg), "b", tmp_path)
    assert a.hash == b.hash
    c = registry.save(train(tiny_config(data_dir, epochs=1, limit_train=256, seed=1)), "c", tmp_path)
    assert c.hash != a.hash


def test_progress_callback_sees_every_epoch(data_dir):
    seen = []
    train(tiny_config(data_dir, epochs=3, limit_train=128), progress=seen.append)
    assert [r.epoch for r in seen] == [1, 2, 3] and all(r.epochs == 3 for r in seen)


def test_pruning_bounds_active_inputs(data_dir):
    cfg = tiny_config(data_dir, epochs=2, limit_train=256)
    cfg = cfg.replace(model=ModelConfig(hidden=(8, 4), max_active_inputs=20))
    model = train(cfg).model
    nz = [(layer.weight != 0).sum(dim=1) for layer in model.linears()]
    assert int(nz[0].max()) <= 20 and int(nz[0].max()) > 0
    assert int(nz[1].max()) <= 8  # in_features 8 < 20: left dense


def test_multilabel_rgb_and_linear_models(tmp_path):
    make_npz(tmp_path, "chestmnist", n=64)
    make_npz(tmp_path, "bloodmnist", n=64)
    with pytest.warns(UserWarning):
        r = train(tiny_config(tmp_path, "chestmnist", epochs=2))
    assert len(r.thresholds) == 14 and r.model.linears()[-1].out_features == 14
    assert 0 <= r.metrics["test"]["accuracy"] <= 1
    cfg = tiny_config(tmp_path, "bloodmnist", epochs=2).replace(model=ModelConfig(hidden=()))
    with pytest.warns(UserWarning):
        r = train(cfg)
    assert len(r.model.linears()) == 1 and r.model.linears()[0].in_features == 28 * 28 * 3


def test_registry_default_is_newest_and_roundtrips(tiny_saved, models_dir):
    latest = registry.load("pneumoniamnist", None, models_dir)
    assert latest.name == max(registry.list_models("pneumoniamnist", models_dir), key=lambda m: m.created).name
    again = registry.load("pneumoniamnist", "tiny", models_dir)
    assert again.hash == tiny_saved.hash and again.config == tiny_saved.config
    x = np.random.default_rng(0).uniform(-1, 1, (4, 784)).astype(np.float32)
    import torch

    with torch.no_grad():
        assert torch.equal(again.load_torch()(torch.from_numpy(x)), tiny_saved.load_torch()(torch.from_numpy(x)))
    with pytest.raises(registry.ModelNotFound, match="python -m engine train --dataset dermamnist"):
        registry.load("dermamnist", None, models_dir)
    with pytest.raises(registry.ModelNotFound, match="available: .*tiny"):
        registry.load("pneumoniamnist", "nope", models_dir)


def test_affine_augmentation_is_bounded(data_dir):
    from engine.learn.data import DataConfig, load_split
    from engine.learn.augment import random_affine

    images = load_split(DataConfig("pneumoniamnist", data_dir=str(data_dir)), "val").images[:64]
    rng = np.random.default_rng(0)
    assert np.allclose(random_affine(images, 0, 0, 0, rng), images, atol=1e-3)

    def centroid(x):
        x = np.asarray(x, dtype=np.float64)
        rows, cols = np.indices(x.shape[1:])
        mass = x.sum(axis=(1, 2))
        return np.stack([(x * rows).sum(axis=(1, 2)) / mass, (x * cols).sum(axis=(1, 2)) / mass], axis=1)

    blobs = np.zeros((64, 28, 28), dtype=np.uint8)
    blobs[:, 12:16, 12:16] = 200  # a bright square in the middle: its centroid moves with the shift
    moved = random_affine(blobs, 2, 0, 0, rng)
    step = np.abs(centroid(moved) - centroid(blobs))
    assert moved.shape == blobs.shape and step.max() <= 2.01 and step.mean() > 0.3
    turned = random_affine(images, 0, 10, 0.1, rng)
    assert not np.allclose(turned, images, atol=1) and 0 <= turned.min() and turned.max() <= 255
    rgb = np.repeat(images[..., None], 3, axis=-1)
    assert random_affine(rgb, 2, 10, 0.1, rng).shape == rgb.shape


def test_class_weighted_training_selects_on_balanced_accuracy(data_dir):
    from engine.learn.metrics import balanced_accuracy
    from engine.learn.data import dataset_info

    info = dataset_info("pneumoniamnist")
    y = np.array([0, 0, 0, 1])
    all_pneumonia = np.tile([0.2, 0.8], (4, 1))
    assert balanced_accuracy(y, all_pneumonia, info) == 0.5
    r = train(tiny_config(data_dir, epochs=4, limit_train=512, augment_shift=2, augment_rotate=10, augment_scale=0.1))
    score = [h.val_balanced_accuracy + 1e-3 * h.val_auc for h in r.history]
    assert r.best_epoch == 1 + int(np.argmax(score))
    assert all(0.5 <= h.val_balanced_accuracy <= 1 for h in r.history)


def test_distill_loss_is_zero_only_when_the_student_matches_the_teacher():
    import torch

    from engine.learn.losses import distill_loss

    t = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    assert float(distill_loss(t.clone(), t, 4.0, multi_label=False)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_loss(-t, t, 4.0, multi_label=False)) > 0.01
    # multi-label: BCE against the teacher's probabilities is smallest at the teacher's logits
    assert float(distill_loss(t, t, 4.0, True)) < float(distill_loss(-t, t, 4.0, True))


def test_distillation_trains_a_cached_cnn_teacher_once(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path))
    # rounding noise: the student draws from torch's generator after its teacher is had
    cfg = tiny_config(data_dir, epochs=1, limit_train=1024, distill=0.7, teacher_epochs=8, rounding_noise=0.5)
    first = train(cfg)
    teachers = list((tmp_path / "teachers").glob("*.pt"))
    assert len(teachers) == 1
    stamp = teachers[0].stat().st_mtime_ns
    # The teacher is a real classifier, well above the majority class (74% of validation).
    from engine.learn.data import load_split
    from engine.learn.teacher import TeacherCNN, teacher_logits
    import torch

    teacher = TeacherCNN(1, 2)
    teacher.load_state_dict(torch.load(teachers[0], weights_only=True))
    val = load_split(cfg.data, "val")
    acc = float((teacher_logits(teacher, val.images).argmax(1).numpy() == val.labels[:, 0]).mean())
    assert acc > 0.9
    second = train(cfg.replace(train=dataclasses.replace(cfg.train, seed=1)))  # another student, same teacher
    assert teachers[0].stat().st_mtime_ns == stamp and len(list((tmp_path / "teachers").glob("*.pt"))) == 1
    assert first.metrics["val"]["auc"] > 0.6 and second.metrics["val"]["auc"] > 0.6
    # the same student whether its teacher was trained in the run or read from the cache
    again = train(cfg)
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()))


def test_rounding_noise_is_bounded_and_training_only(data_dir):
    import torch

    from engine.learn.losses import RoundingNoise

    model = train(tiny_config(data_dir, epochs=1, limit_train=128)).model
    layer, last = model.linears()[0], model.linears()[-1]
    out = torch.randn(256, layer.out_features) * 3
    noise = RoundingNoise(model, bits=4, steps=1.0)
    layer.train()
    step = float((out.amax(0) - out.amin(0)).max()) / 2**4  # one rounding step at 4 bits
    d = (noise._hook(layer, (), out) - out).abs()
    assert 0 < float(d.max()) <= step + 1e-5 and float(d.mean()) > step / 4  # uniform in [-step, step]
    layer.eval()
    assert noise._hook(layer, (), out) is out  # evaluation (and export) untouched
    keys = set(model.state_dict())
    with noise:  # hidden layers only: the output layer has no lookup after it
        assert len(layer._forward_hooks) == 1 and not last._forward_hooks
    assert not layer._forward_hooks and set(model.state_dict()) == keys
