"""The four inference modes behind one call, with per-image timings.

- ``float``: the PyTorch model (Brevitas fake-quantization, float arithmetic);
- ``quantized``: the compiled quantized module in the clear (``fhe="disable"``);
- ``simulate``: the TFHE circuit in simulation (same integers, simulated PBS noise);
- ``fhe``: real encryption: client quantizes + encrypts, server runs on ciphertext with
  evaluation keys only, client decrypts + dequantizes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from . import metrics, registry
from .config import CompileConfig
from .data import to_features
from .fhe import CompiledModel, FHEClient, FHEServer, compile_model

if TYPE_CHECKING:
    from .distribute import BatchResult

MODES = ("float", "quantized", "simulate", "fhe")
ProgressFn = Callable[[int, int, str], None]


def parse_modes(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"all"`` or a comma list (or a list) -> validated modes in canonical order."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [m.strip().lower() for m in items if m.strip()]
    if items == ["all"]:
        return list(MODES)
    bad = [m for m in items if m not in MODES]
    if bad or not items:
        raise ValueError(f"Unknown mode(s) {', '.join(bad) or '(none)'}; use 'all' or a comma list of {', '.join(MODES)}.")
    return [m for m in MODES if m in items]


@dataclass
class ModeResult:
    mode: str
    logits: np.ndarray  # (N, C)
    scores: np.ndarray  # probabilities (N, C)
    predictions: np.ndarray  # (N,) class index, or (N, L) for multi-label
    latency_s: np.ndarray  # (N,) per image, end to end on this side
    stages: dict[str, np.ndarray] = field(default_factory=dict)  # fhe: encrypt/server/decrypt
    sizes: dict[str, int] = field(default_factory=dict)  # fhe: ciphertext/result/eval-key bytes


@dataclass
class Predictor:
    """A saved model with its compiled circuit, a client (keys) and a server, built lazily.

    The dashboard shares ``compiled`` and ``server`` across sessions and gives each session
    its own ``client``; the CLI and tests use one of each.
    """

    saved: registry.SavedModel
    compile_config: CompileConfig | None = None
    cache_dir: Path | None = None
    key_dir: Path | None = None
    compiled: CompiledModel | None = None
    client: FHEClient | None = None
    server: FHEServer | None = None
    progress_text: Callable[[str], None] | None = None

    @classmethod
    def open(cls, dataset: str, name: str | None = None, models_dir: Path | None = None, **kw) -> "Predictor":
        return cls(saved=registry.load(dataset, name, models_dir), **kw)

    @property
    def info(self):
        from .data import dataset_info

        return dataset_info(self.saved.dataset)

    @cached_property
    def torch_model(self):
        return self.saved.load_torch()

    def ensure_compiled(self) -> CompiledModel:
        if self.compiled is None:
            self.compiled = compile_model(self.saved, self.compile_config, self.cache_dir, self.progress_text)
        return self.compiled

    def ensure_client(self) -> FHEClient:
        if self.client is None:
            self.client = FHEClient(self.ensure_compiled(), self.key_dir)
        return self.client

    def ensure_server(self) -> FHEServer:
        if self.server is None:
            self.server = FHEServer(self.ensure_compiled().deployment_dir)
        return self.server

    def features(self, images: np.ndarray) -> np.ndarray:
        """The model's input for uint8 images: the client-side preprocessing."""
        return to_features(images, self.saved.config.model.input_pool)

    def run(self, images: np.ndarray, modes=MODES, progress: ProgressFn | None = None) -> dict[str, ModeResult]:
        """Run uint8 images (N, H, W[, C]) through each mode in ``modes``."""
        modes = parse_modes(modes)
        x = self.features(images)
        if x.shape[1] != self.saved.in_features:
            raise ValueError(
                f"Images have {x.shape[1]} values each but the model expects {self.saved.in_features}: "
                f"use {self.saved.dataset} images of the model's size."
            )
        if any(m != "float" for m in modes):
            self.ensure_compiled()
        if "fhe" in modes:
            self.ensure_client().keygen()
            # Register this client's evaluation keys with the server once per batch.
            self._key_id = self.ensure_server().register(self.client.evaluation_keys())
        total, done = len(x) * len(modes), 0
        out = {}
        for mode in modes:
            step = getattr(self, f"_one_{mode}")
            logits, lat, stages, sizes = [], [], {}, {}
            for i in range(len(x)):
                t0 = time.perf_counter()
                y, st, sz = step(x[i : i + 1])
                lat.append(time.perf_counter() - t0)
                logits.append(np.asarray(y, dtype=np.float64).reshape(1, -1))
                for k, v in st.items():
                    stages.setdefault(k, []).append(v)
                sizes.update(sz)
                done += 1
                if progress:
                    progress(done, total, f"{mode}: image {i + 1}/{len(x)}")
            logits = np.concatenate(logits) if logits else np.zeros((0, self.saved.n_outputs))
            out[mode] = self.result(mode, logits, np.asarray(lat), {k: np.asarray(v) for k, v in stages.items()}, sizes)
        return out

    def result(self, mode: str, logits: np.ndarray, latency_s: np.ndarray, stages=None, sizes=None) -> ModeResult:
        """Package logits and timings as a :class:`ModeResult` (scores, predictions)."""
        scores = metrics.scores_from_logits(logits, self.info)
        return ModeResult(mode=mode, logits=logits, scores=scores,
                          predictions=metrics.predict(scores, self.info, self.saved.thresholds),
                          latency_s=latency_s, stages=stages or {}, sizes=sizes or {})

    def run_distributed(self, images: np.ndarray, backend: str = "local", scheduler: str | None = None,
                        n_jobs: int = 2) -> tuple[ModeResult, "BatchResult"]:
        """Encrypted mode over a batch spread across processes or a Dask cluster."""
        from .distribute import run_batch

        client = self.ensure_client()
        client.keygen()
        batch = run_batch(client, self.ensure_compiled().deployment_dir / "server.zip", self.features(images),
                          backend, scheduler, n_jobs)
        stages = {"encrypt_s": batch.encrypt_s, "server_s": batch.server_s, "decrypt_s": batch.decrypt_s}
        latency = batch.encrypt_s + batch.server_s + batch.decrypt_s
        return self.result("fhe", batch.logits, latency, stages, batch.sizes), batch

    # one image (1, F) per call: returns logits, stage timings, sizes
    def _one_float(self, x):
        import torch

        with torch.no_grad():
            return self.torch_model(torch.from_numpy(x)).numpy(), {}, {}

    def _one_quantized(self, x):
        return self.compiled.run_clear(x), {}, {}

    def _one_simulate(self, x):
        c = self.compiled
        return c.dequantize(c.simulator.run(c.quantize(x))), {}, {}

    def _one_fhe(self, x):
        client, server = self.client, self.server
        t0 = time.perf_counter()
        ct = client.encrypt(x)
        t1 = time.perf_counter()
        res = server.run(ct, self._key_id)
        t2 = time.perf_counter()
        y = client.decrypt(res)
        t3 = time.perf_counter()
        stages = {"encrypt_s": t1 - t0, "server_s": t2 - t1, "decrypt_s": t3 - t2}
        sizes = {"ciphertext_bytes": len(ct), "result_bytes": len(res), "eval_key_bytes": len(client.evaluation_keys())}
        return y, stages, sizes
