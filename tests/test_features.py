"""The client's feature stage (engine.learn.features): the shipped pixel models answer as before,
the wavelet scattering stage is fixed and stable to small shifts, its scaling travels with the
model, and a scattering model compiles and runs encrypted (real Concrete ML, a tiny circuit)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from engine.config import DataConfig, ModelConfig
from engine.learn import registry
from engine.learn.data import load_split, to_features
from engine.learn.features import (FeatureNorm, Scattering, describe, features, from_description, remote_features,
                                   stage_of)

SCATTER = dataclasses.replace(ModelConfig(hidden=(8,), weight_bits=3, act_bits=3, input_bits=3),
                              features="scattering", feature_grid=1)


@pytest.fixture(scope="module")
def val_images(data_dir):
    return load_split(DataConfig("pneumoniamnist", data_dir=str(data_dir), allow_download=False), "val").images[:64]


def test_shipped_pixel_models_compute_what_they_did_and_keep_their_hash(val_images):
    shipped = [m for m in registry.list_models() if m.config.model.features == "pixels"]
    names = {m.name for m in shipped}
    assert {"fcnn-16-w2a2i3-pool3", "fcnn-16-w2a2i3-grid10-real", "fcnn-16-w2a3i3-pool3-prune16"} <= names
    for saved in shipped:
        m = saved.config.model
        assert saved.feature_norm is None
        assert np.array_equal(saved.features(val_images), to_features(val_images, m.input_pool, m.input_levels))
        weights = (saved.path / registry.WEIGHTS).read_bytes()
        assert registry.content_hash(weights, saved.config) == saved.hash


def test_the_shipped_default_reads_wavelet_scattering(val_images):
    saved = registry.load("pneumoniamnist")
    assert saved.config.model.features == "scattering" and saved.feature_norm is not None
    assert saved.features(val_images).shape == (64, saved.in_features)
    assert saved.stage_description()["feature_norm"]["select"]  # only the features its neurons read


def test_scattering_is_fixed_and_shaped_by_its_parameters(val_images):
    stage = stage_of(SCATTER)
    assert isinstance(stage, Scattering) and stage.channels == 81
    x = stage(val_images)
    assert x.shape == (64, 81) and x.dtype == np.float32 and np.isfinite(x).all()
    assert np.array_equal(stage(val_images), x)  # no state, no randomness
    assert stage_of(dataclasses.replace(SCATTER, feature_grid=2))(val_images[:2]).shape == (2, 324)
    assert stage_of(dataclasses.replace(SCATTER, scattering_l=4))(val_images[:2]).shape == (2, 1 + 8 + 16)
    rgb = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 3), dtype=np.uint8)
    assert stage(rgb).shape == (3, 3 * 81)
    with pytest.raises(ValueError, match="multiples of 4"):
        stage(np.zeros((1, 30, 30), np.uint8))
    with pytest.raises(ValueError, match="Unknown feature stage"):
        ModelConfig(features="hog")


def test_scattering_moves_less_than_pixels_under_a_small_shift(val_images):
    """Locally invariant to translation: a 1-pixel shift changes the standardized scattering
    features of an X-ray much less than its standardized pixels."""
    moved = np.roll(val_images, 1, axis=2)
    pixels = ModelConfig(input_pool=1)

    def relative_change(model):
        raw = stage_of(model)(val_images)
        norm = FeatureNorm.fit(raw)
        a, b = norm(raw), norm(stage_of(model)(moved))
        return float(np.linalg.norm(a - b) / np.linalg.norm(a))

    assert relative_change(SCATTER) < 0.5 * relative_change(pixels)


def test_a_scattering_model_needs_and_keeps_its_scaling(val_images):
    with pytest.raises(ValueError, match="stored scaling"):
        features(val_images, SCATTER)
    norm = FeatureNorm.fit(stage_of(SCATTER)(val_images))
    x = features(val_images, SCATTER, norm)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    # what a remote client is told (GET /circuits) gives the same values
    d = json.loads(json.dumps(describe(SCATTER, norm, 28, 1)))
    assert d["kind"] == "scattering" and d["reads"] == [28, 28, 1]
    model, back = from_description(d)
    assert model.features == "scattering" and np.allclose(features(val_images, model, back), x, atol=1e-6)
    assert np.allclose(remote_features(val_images, {"feature_stage": d}), x, atol=1e-6)
    # a service from before the stage describes only the pooling
    old = {"input_pool": 3, "input_levels": 0}
    assert np.array_equal(remote_features(val_images, old), to_features(val_images, 3))


@pytest.fixture(scope="module")
def scattering_saved(data_dir, tmp_path_factory):
    from engine.learn.train import train
    from tests.conftest import tiny_config

    cfg = tiny_config(data_dir, epochs=3, limit_train=512, balance_decision=True)
    cfg = cfg.replace(model=dataclasses.replace(SCATTER, max_active_inputs=6))  # pruned: 8 neurons x 6 inputs
    return registry.save(train(cfg), "tiny-scattering", tmp_path_factory.mktemp("models"))


def test_scattering_model_is_saved_with_its_stage_and_scaling(scattering_saved, val_images):
    meta = json.loads((scattering_saved.path / registry.META).read_text())
    norm = meta["feature_norm"]
    assert meta["config"]["model"]["features"] == "scattering"
    # pruned: only the features some neuron reads are computed into the input and encrypted
    n = scattering_saved.in_features
    assert n <= 8 * 6 and len(norm["mean"]) == len(norm["select"]) == n and max(norm["select"]) < 81
    assert "scattering" in scattering_saved.stage_text()
    assert scattering_saved.features(val_images).shape == (64, n)
    w = scattering_saved.load_torch().linears()[0].weight.detach()
    assert bool((w != 0).any(dim=0).all())  # every input left is read
    assert -3 <= meta["metrics"]["decision_offset"] <= 3
    again = registry.load("pneumoniamnist", "tiny-scattering", scattering_saved.path.parent.parent)
    assert np.array_equal(again.features(val_images), scattering_saved.features(val_images))
    # the scaling is part of the function the model computes: another scaling, another hash
    weights = (scattering_saved.path / registry.WEIGHTS).read_bytes()
    other = FeatureNorm(again.feature_norm.mean + 1, again.feature_norm.scale)
    assert registry.content_hash(weights, again.config, again.feature_norm) == again.hash
    assert registry.content_hash(weights, again.config, other) != again.hash
    assert scattering_saved.metrics["val"]["auc"] > 0.85, scattering_saved.metrics  # it learned


def test_scattering_model_runs_encrypted(scattering_saved, test_split, tmp_path):
    from engine.study.infer import Predictor

    p = Predictor(saved=scattering_saved, cache_dir=tmp_path / "cache", key_dir=tmp_path / "keys")
    res = p.run(test_split.images[:4], "quantized,simulate,fhe")
    assert p.compiled.report.input_shape[-1] == scattering_saved.in_features < 81
    assert np.array_equal(res["quantized"].predictions, res["simulate"].predictions)
    assert np.array_equal(res["simulate"].predictions, res["fhe"].predictions)
    assert np.allclose(res["fhe"].logits, res["simulate"].logits)


def test_balanced_decision_moves_the_output_bias_to_the_best_offset():
    import torch

    from engine.learn.model import build_model
    from engine.learn.train import balance_decision, logits_of

    torch.manual_seed(0)
    model = build_model(4, 2, ModelConfig(hidden=(4,)))
    model.eval()
    x = np.random.default_rng(0).normal(size=(400, 4)).astype(np.float32)
    margin = logits_of(model, x) @ np.array([-1.0, 1.0])
    # labels that the decision "margin > q" separates perfectly, q away from the model's own 0
    q = float(np.quantile(margin, 0.3)) if np.quantile(margin, 0.3) < -0.15 else float(np.quantile(margin, 0.7))
    y = (margin > q).astype(np.int64)
    assert abs(q) > 0.1 and ((margin > 0) == y).mean() < 1
    d = balance_decision(model, [(x, y)])
    after = logits_of(model, x) @ np.array([-1.0, 1.0])
    assert np.allclose(after, margin + d, atol=1e-4) and abs(d + q) <= 0.1
    assert ((after > 0) == y).mean() > ((margin > 0) == y).mean()


def test_a_batched_circuit_is_checked_before_it_is_used(scattering_saved, tmp_path):
    """A circuit for several images per call enters the cache only if, in simulation, it gives the
    model's answers (engine.fhe.circuit.batched_agreement); one that does not is refused."""
    from engine.fhe.circuit import MIN_BATCHED_AGREEMENT, BatchedCircuitError, batched_agreement, compile_model

    cc = dataclasses.replace(scattering_saved.config.compile, batch_size=4)
    try:
        compiled = compile_model(scattering_saved, cc, tmp_path)
    except BatchedCircuitError as exc:
        assert "images per call" in str(exc) and not list((tmp_path / "circuits").glob("[!.]*"))
        return
    x = scattering_saved.calibration_features(64)
    assert batched_agreement(compiled, x) >= MIN_BATCHED_AGREEMENT
