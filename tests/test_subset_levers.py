"""Issue 31's levers: intensity levels computed on the client, gradual pruning, best of several seeds,
with real training and a real (tiny) circuit."""

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import tiny_config

from engine.config import ModelConfig, TrainConfig
from engine.learn import registry
from engine.learn.data import intensity_levels, load_split, to_features
from engine.learn.features import features
from engine.learn.model import build_model
from engine.learn.train import train


def test_intensity_levels_are_shares_above_fixed_levels():
    img = np.zeros((2, 28, 28), np.uint8)
    img[0, :14] = 255  # half the pixels at 255
    img[1] = 100  # all at 100: above the levels 63.75 only (levels 3: 63.75, 127.5, 191.25)
    f = intensity_levels(img, 3)
    assert f.shape == (2, 3)
    assert np.allclose(f[0], 0.0) and np.allclose(f[1], [1.0, -1.0, -1.0])  # share 0.5 -> 0; 1 -> 1; 0 -> -1
    rgb = np.zeros((1, 28, 28, 3), np.uint8)
    rgb[..., 0] = 255  # red channel full, the others empty: brightness 85 for every pixel
    g = intensity_levels(rgb, 3).reshape(4, 3)  # red, green, blue, brightness
    assert np.allclose(g[0], 1) and np.allclose(g[1:3], -1) and np.allclose(g[3], [1, -1, -1])
    m = ModelConfig(input_pool=2, input_levels=3)
    x = features(rgb, m)
    assert x.shape == (1, 14 * 14 * 3 + 12) and np.array_equal(x, to_features(rgb, 2, 3))
    assert np.array_equal(x[:, :588], to_features(rgb, 2))  # the pooled image first, unchanged
    with pytest.raises(ValueError, match="input_levels"):
        ModelConfig(input_levels=33)


def test_gradual_pruning_keeps_fewer_inputs_each_step_and_the_same_parameters():
    torch.manual_seed(0)
    model = build_model(50, 3, ModelConfig(hidden=(6,), max_active_inputs=8))
    first = model.linears()[0]
    param = first.weight
    model.apply_pruning(0.5)  # 50 - round(0.5 * 42) = 29 inputs per neuron
    kept_half = (first.weight != 0).sum(dim=1)
    assert kept_half.tolist() == [29] * 6 and first.weight_orig is param
    with torch.no_grad():
        first.weight_orig.add_(torch.randn_like(first.weight_orig))  # learning between the steps
    mask_half = first.weight != 0
    model.apply_pruning(1.0)
    mask = first.weight != 0
    assert mask.sum(dim=1).tolist() == [8] * 6 and first.weight_orig is param
    assert not (mask & ~mask_half).any()  # what an earlier step cut stays cut
    assert (model.linears()[1].weight != 0).sum(dim=1).max() <= 6  # 6 inputs < 8: left dense


def test_best_of_seeds_keeps_the_run_that_scored_best(data_dir, tmp_path):
    seen = []
    cfg = tiny_config(data_dir, epochs=2, limit_train=256, seeds=2)
    r = train(cfg, progress=seen.append)
    assert [(s.epoch, s.epochs, s.seed) for s in seen] == [(1, 4, 0), (2, 4, 0), (3, 4, 1), (4, 4, 1)]
    runs = r.metrics["seeds"]
    assert [x["seed"] for x in runs] == [0, 1]
    best = max(runs, key=lambda x: (x["accumulator_bits"] <= 6, x["score"]))  # narrow accumulators first
    assert r.metrics["chosen_seed"] == best["seed"] and r.score == best["score"]
    assert r.metrics["val"]["accuracy"] == best["val_accuracy"]
    accs = [x["val_accuracy"] for x in runs]
    assert r.metrics["seed_spread"] == max(accs) - min(accs)
    # the chosen run is the one a single run of that seed gives
    alone = train(tiny_config(data_dir, epochs=2, limit_train=256, seed=best["seed"]))
    assert alone.metrics["val"] == r.metrics["val"]
    assert r.config.train.seeds == 2  # the model records what produced it
    with pytest.raises(ValueError, match="seeds"):
        TrainConfig(seeds=0)


def test_a_model_with_levels_and_gradual_pruning_runs_encrypted(data_dir, tmp_path):
    from engine.study.infer import Predictor

    cfg = tiny_config(data_dir, epochs=3, limit_train=512, prune_epochs=2)
    cfg = cfg.replace(model=ModelConfig(hidden=(8,), weight_bits=2, act_bits=3, input_bits=3, max_active_inputs=8,
                                        input_pool=2, input_levels=4))
    saved = registry.save(train(cfg), "levels", tmp_path / "models")
    assert saved.in_features == 14 * 14 + 4
    net = saved.load_torch()
    assert int((net.linears()[0].weight != 0).sum(dim=1).max()) <= 8
    p = Predictor(saved=saved, cache_dir=tmp_path / "cache", key_dir=tmp_path / "keys")
    images = load_split(cfg.data, "test").images[:3]
    out = p.run(images, modes="simulate,fhe")
    assert out["fhe"].predictions.tolist() == out["simulate"].predictions.tolist()
    # the accumulator width estimated at training is the circuit's
    assert saved.metrics["accumulator_bits"] == p.compiled.report.max_bit_width
    assert np.allclose(out["fhe"].logits, out["simulate"].logits)
    # a model from before the field (its config has no input_levels) keeps its content hash
    plain = cfg.replace(model=dataclasses.replace(cfg.model, input_levels=0))
    later = ("input_levels", "features", "scattering_j", "scattering_l", "feature_grid")  # fields added since
    before = {k: v for k, v in dataclasses.asdict(plain.model).items() if k not in later}
    h = hashlib.sha256(b"w" + json.dumps(before, sort_keys=True).encode() + b"pneumoniamnist28").hexdigest()
    assert registry.content_hash(b"w", plain) == h != registry.content_hash(b"w", cfg)


def test_quick_search_keeps_the_best_variant_with_its_own_config(data_dir):
    from engine.learn.quick_search import candidates, quick_search

    base = tiny_config(data_dir, epochs=1, limit_train=256)
    plain = base.replace(model=dataclasses.replace(base.model, input_pool=2, input_levels=0))
    assert [n for n, _ in candidates(plain)] == ["the recipe", "7x7 grid (4x4 pixel means)"]  # no duplicate
    cfg = plain.replace(model=dataclasses.replace(plain.model, input_levels=3))
    seen = []
    r = quick_search(cfg, progress=seen.append)
    rows = r.metrics["quick_search"]
    assert [x["variant"] for x in rows] == ["the recipe", "without intensity levels", "7x7 grid (4x4 pixel means)"]
    assert [s.epoch for s in seen] == [1, 2, 3] and all(s.epochs == 3 for s in seen)
    best = max(rows, key=lambda x: (x["accumulator_bits"] <= 6, x["score"]))
    assert r.metrics["quick_search_chosen"] == best["variant"] and r.score == best["score"]
    assert dataclasses.asdict(r.config.model) == best["model"]  # the saved model carries the variant it is
    n_in = {"the recipe": 14 * 14 + 3, "without intensity levels": 14 * 14, "7x7 grid (4x4 pixel means)": 49 + 3}
    assert r.model.linears()[0].in_features == n_in[best["variant"]]


def test_narrow_accumulators_go_first_then_the_score():
    from engine.learn.train import TrainResult, better

    def run(bits, score):
        return TrainResult(model=None, config=None, metrics={"accumulator_bits": bits}, score=score)

    assert better(run(6, 0.80), run(7, 0.90))  # a 7-bit circuit would need a slower stable setting
    assert better(run(7, 0.90), run(8, 0.80)) and not better(run(8, 0.80), run(7, 0.90))  # both wide: the score
    assert better(run(5, 0.81), run(6, 0.80)) and better(run(6, 0.1), None)
