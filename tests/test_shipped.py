"""Circuits shipped with the models (``compile --ship``): a fresh clone compiles nothing and makes
no throwaway key at start, and what it hosts answers like the model's own quantized circuit."""

from __future__ import annotations

import shutil

import numpy as np

from engine.config import REPO_ROOT, ServiceConfig
from engine.fhe.circuit import SHIPPED_DIR, cache_key, shipped_entry
from engine.learn import registry
from engine.learn.data import load_samples
from engine.serve.client import EncryptedClient
from engine.serve.transports import InProcessTransport
from engine.serve.hosting import Service


def test_every_shipped_model_carries_its_own_circuit():
    models = registry.list_models(None, REPO_ROOT / "models")
    assert models
    for saved in models:
        folder = shipped_entry(saved)
        assert folder is not None, f"{saved.dataset}/{saved.name}: run python -m engine compile --dataset {saved.dataset} --ship"
        assert not (folder / "warmup" / "evaluation_keys.bin").exists()  # no throwaway key material in the repository
        assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 200_000


def test_a_fresh_cache_hosts_the_shipped_circuit_without_compiling(tmp_path):
    shipped = registry.load("pneumoniamnist", None, REPO_ROOT / "models")
    models = tmp_path / "models" / "pneumoniamnist"
    shutil.copytree(shipped.path, models / shipped.path.name)
    steps: list[str] = []
    service = Service(ServiceConfig(models_dir=str(tmp_path / "models"), cache_dir=str(tmp_path / "cache"))).load(steps.append)
    try:
        text = "\n".join(steps)
        assert "shipped with the model" in text
        assert "compiling" not in text and "throwaway" not in text  # no compile, no throwaway key
        assert "building the circuit's library" in text  # native code: made on this machine
        (c,) = service.circuits.values()
        assert c.id == cache_key(shipped.hash, shipped.config.compile)
        assert not (c.compiled.path / "warmup" / "evaluation_keys.bin").exists()
        assert c.footprint > 50 * 2**20  # the measured key-set memory, shipped

        client = EncryptedClient.download(InProcessTransport(service), c.id, tmp_path / "client", keep_evaluation_keys=True)
        client.register()
        keys = client.fhe.evaluation_keys()
        assert c.warm.keys_fit(keys)  # the shipped structure words accept real keys...
        forged = bytearray(keys)
        word = int(c.warm.key_index[len(c.warm.key_index) // 2])
        forged[8 * word] ^= 1
        assert not c.warm.keys_fit(bytes(forged))  # ...and refuse a forged parameter
        samples = load_samples("pneumoniamnist")
        x = shipped.features(samples.images[:2])  # the model's own feature stage and scaling
        encrypted = np.concatenate([client.predict(x[i : i + 1])[0] for i in range(2)])
        np.testing.assert_allclose(encrypted, c.compiled.run_clear(x), atol=1e-6)
    finally:
        service.close()
    assert (tmp_path / "models" / "pneumoniamnist" / shipped.path.name / SHIPPED_DIR).exists()
