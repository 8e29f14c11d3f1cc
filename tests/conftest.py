"""Shared fixtures: the real MedMNIST folder, generated files of other subsets, and one tiny
model trained, saved and compiled once per session (real Concrete ML, a 784-8-2 circuit)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from medmnist import INFO

from engine.config import CompileConfig, DataConfig, ModelConfig, PipelineConfig, TrainConfig, shared_medmnist_dir

REPO = Path(__file__).resolve().parent.parent


def real_data_dir() -> Path:
    for cand in (shared_medmnist_dir(),):
        if cand and (Path(cand) / "pneumoniamnist.npz").exists():
            return Path(cand)
    pytest.fail("PneumoniaMNIST not found: set MEDMNIST_DIR to the folder holding pneumoniamnist.npz", pytrace=False)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return real_data_dir()


def make_npz(folder: Path, flag: str, n: int = 40, size: int = 28, seed: int = 0) -> Path:
    """A small file in the official MedMNIST layout for ``flag`` (random but learnable)."""
    info = INFO[flag]
    rng = np.random.default_rng(seed)
    shape = (size, size) if info["n_channels"] == 1 else (size, size, info["n_channels"])
    n_labels = len(info["label"])
    arrays = {}
    for split in ("train", "val", "test"):
        if info["task"].startswith("multi-label"):
            labels = rng.integers(0, 2, size=(n, n_labels)).astype(np.uint8)
            signal = labels[:, :1]
        else:
            labels = (np.arange(n) % n_labels).reshape(n, 1).astype(np.uint8)
            signal = labels
        base = rng.integers(0, 100, size=(n, *shape))
        images = (base + 150 * (signal.reshape(n, *([1] * len(shape))) % 2)).clip(0, 255).astype(np.uint8)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    name = f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / name, **arrays)
    return folder / name


TINY = ModelConfig(hidden=(8,), weight_bits=3, act_bits=3, input_bits=3)
# Exact rounding and a tiny p_error make simulation and encryption agree image for image, and
# make servers in different processes return identical ciphertexts (approximate rounding flips
# a few percent of borderline images at random; at p_error=0.01 one image in two has a lookup
# whose result depends on floating-point details of the FFT). It costs no speed at this size.
TINY_COMPILE = CompileConfig(rounding_threshold_bits=4, rounding_method="exact", p_error=1e-5, inputset_size=128)


def tiny_config(data_dir: Path, dataset: str = "pneumoniamnist", **train) -> PipelineConfig:
    return PipelineConfig(
        data=DataConfig(dataset, data_dir=str(data_dir), allow_download=False),
        model=TINY,
        train=TrainConfig(**{"epochs": 2, "limit_train": 1024, **train}),
        compile=TINY_COMPILE,
    )


def unusual_recipe(folder: Path, dataset: str = "pneumoniamnist") -> dict:
    """A recipe file for ``dataset`` in ``folder`` (``ENGINE_RECIPES_DIR``) whose every field is off
    its default, cheap to train (one hidden layer of 4, 1 epoch); its config as written."""
    config = {
        "model": {"hidden": [4], "weight_bits": 2, "act_bits": 2, "input_bits": 2, "max_active_inputs": 9,
                  "input_pool": 4, "input_levels": 3, "features": "pixels", "scattering_j": 3, "scattering_l": 4,
                  "feature_grid": 3},
        "train": {"epochs": 1, "batch_size": 48, "lr": 0.004, "weight_decay": 0.0003, "seed": 5, "class_weighting": False,
                  "limit_train": 0, "augment_shift": 1, "augment_rotate": 4.0, "augment_scale": 0.05,
                  "augment_stretch": 0.07, "augment_upload": 0.2, "distill": 0.0, "distill_temperature": 2.5,
                  "teacher_epochs": 3, "rounding_noise": 0.1, "image_copies": 2, "prune_after": 0.5, "prune_epochs": 2,
                  "seeds": 1, "select_framed": True, "balance_decision": True},
        "compile": {"rounding_threshold_bits": 5, "rounding_method": "exact", "p_error": 0.02, "inputset_size": 256,
                    "batch_size": 1},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{dataset}.json").write_text(json.dumps({"dataset": dataset, "from": "a test", "config": config}))
    return config


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_saved(data_dir, models_dir):
    from engine.learn import registry
    from engine.learn.train import train

    return registry.save(train(tiny_config(data_dir)), "tiny", models_dir)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def predictor(tiny_saved, cache_dir, tmp_path_factory):
    from engine.study.infer import Predictor

    p = Predictor(saved=tiny_saved, cache_dir=cache_dir, key_dir=tmp_path_factory.mktemp("keys"))
    p.ensure_compiled()
    return p


@pytest.fixture(scope="session")
def test_split(data_dir):
    from engine.learn.data import load_split

    return load_split(DataConfig("pneumoniamnist", data_dir=str(data_dir), allow_download=False), "test")


def wait_healthy(url: str, log: Path, what: str) -> None:
    """Wait until a service or app a test started answers ``/health`` (5 min at most); fail with
    the end of its ``log`` if it does not."""
    import time
    import urllib.request

    for _ in range(600):
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=1).status == 200:
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{what} did not start: {Path(log).read_text()[-2000:]}")
