"""The four inference modes behind one call, with per-image timings.

- ``float``: the PyTorch model (Brevitas fake-quantization, float arithmetic);
- ``quantized``: the compiled quantized module in the clear (``fhe="disable"``);
- ``simulate``: the TFHE circuit in simulation (same integers, simulated PBS noise);
- ``fhe``: real encryption: client quantizes + encrypts, the service runs the circuit on the
  ciphertext with evaluation keys only, client decrypts + dequantizes. The service is reached
  through a transport (:mod:`engine.serve.client`): in this process by default, or over HTTP.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..learn import metrics, registry
from ..serve.client import EncryptedClient, find_circuit
from ..config import CompileConfig, ServiceConfig
from ..fhe.circuit import CompiledModel, compile_model
from ..fhe.keys import FHEClient
from ..fhe.runtime import FHEServer

if TYPE_CHECKING:
    from ..serve.distribute import BatchResult

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
    stages: dict[str, np.ndarray] = field(default_factory=dict)  # fhe: encrypt/queue/server/network/decrypt
    sizes: dict[str, int] = field(default_factory=dict)  # fhe: ciphertext/result/eval-key bytes
    wire: dict = field(default_factory=dict)  # fhe: what crossed to the service (last image, totals)


@dataclass
class Predictor:
    """A saved model with its compiled circuit, a client (keys) and a service, built lazily.

    Encrypted runs go through ``transport`` (:mod:`engine.serve.client`): by default an in-process
    service hosting this one circuit; the dashboard and ``--server URL`` pass an HTTP
    transport. The dashboard shares ``compiled`` across sessions and gives each session its own
    ``client`` (keys); the CLI and tests use one of each.
    """

    saved: registry.SavedModel
    compile_config: CompileConfig | None = None
    cache_dir: Path | None = None
    key_dir: Path | None = None
    compiled: CompiledModel | None = None
    client: FHEClient | None = None
    server: FHEServer | None = None
    progress_text: Callable[[str], None] | None = None
    transport: object | None = None  # engine.serve.client transport; None: an in-process service
    remote: EncryptedClient | None = None
    keep_evaluation_keys: bool = True  # False: only the secret keys stay after the upload
    batched: dict = field(default_factory=dict, repr=False)  # batch size -> (circuit, client) for it

    @classmethod
    def open(cls, dataset: str, name: str | None = None, models_dir: Path | None = None, **kw) -> "Predictor":
        return cls(saved=registry.load(dataset, name, models_dir), **kw)

    @property
    def info(self):
        from ..learn.data import dataset_info

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

    def ensure_remote(self) -> EncryptedClient:
        """This client's connection to the service hosting the circuit (keys uploaded once)."""
        if self.remote is None:
            compiled = self.ensure_compiled()
            if self.transport is None:
                from ..serve.transports import InProcessTransport
                from ..serve.hosting import Service

                service = Service(ServiceConfig(cache_dir=str(self.cache_dir or "")))
                service.host(self.saved, compiled=compiled)
                service.ready = True
                self.transport = InProcessTransport(service)
                cid = compiled.report.cache_key
            else:
                cid = find_circuit(self.transport, self.saved.dataset, self.saved.hash,
                                   compiled.report.compile)["id"]
            self.remote = EncryptedClient(self.transport, cid, self.ensure_client(),
                                          keep_evaluation_keys=self.keep_evaluation_keys)
        return self.remote

    def features(self, images: np.ndarray) -> np.ndarray:
        """The model's input for uint8 images: the client-side preprocessing."""
        return self.saved.features(images)

    def run(self, images: np.ndarray, modes=MODES, progress: ProgressFn | None = None) -> dict[str, ModeResult]:
        """Run uint8 images (N, H, W[, C]) through each mode in ``modes``."""
        modes = parse_modes(modes)
        x = self.features(images)
        if x.shape[1] != self.saved.in_features:
            raise ValueError(
                f"Images have {x.shape[1]} values each but the model expects {self.saved.in_features}: "
                f"use {self.saved.dataset} images of the model's size."
            )
        if any(m in ("quantized", "simulate") for m in modes) or ("fhe" in modes and self.remote is None):
            self.ensure_compiled()
        if "fhe" in modes:
            self.ensure_client().keygen()
            self.ensure_remote().register()  # the evaluation keys go to the service once
        total, done = len(x) * len(modes), 0
        out = {}
        for mode in modes:
            step = getattr(self, f"_one_{mode}")
            logits, lat, stages, sizes, wire = [], [], {}, {}, {}
            for i in range(len(x)):
                t0 = time.perf_counter()
                y, st, sz = step(x[i : i + 1])
                lat.append(time.perf_counter() - t0)
                logits.append(np.asarray(y, dtype=np.float64).reshape(1, -1))
                for k, v in st.items():
                    stages.setdefault(k, []).append(v)
                sizes.update(sz)
                if mode == "fhe":
                    wire = _wire(self._exchange, wire)
                done += 1
                if progress:
                    progress(done, total, f"{mode}: image {i + 1}/{len(x)}")
            logits = np.concatenate(logits) if logits else np.zeros((0, self.saved.n_outputs))
            out[mode] = self.result(mode, logits, np.asarray(lat), {k: np.asarray(v) for k, v in stages.items()}, sizes)
            out[mode].wire = wire
        return out

    def result(self, mode: str, logits: np.ndarray, latency_s: np.ndarray, stages=None, sizes=None) -> ModeResult:
        """Package logits and timings as a :class:`ModeResult` (scores, predictions)."""
        scores = metrics.scores_from_logits(logits, self.info)
        return ModeResult(mode=mode, logits=logits, scores=scores,
                          predictions=metrics.predict(scores, self.info, self.saved.thresholds),
                          latency_s=latency_s, stages=stages or {}, sizes=sizes or {})

    def run_distributed(self, images: np.ndarray, backend: str = "local", scheduler: str | None = None,
                        n_jobs: int = 2, batch_size: int = 1, warm: bool = False) -> tuple[ModeResult, "BatchResult"]:
        """Encrypted mode over a batch spread across processes or a Dask cluster.

        ``batch_size`` > 1: send that many images per encrypted call, through the circuit
        compiled for it, with this predictor's own keys (the key parameters are the same)."""
        from ..serve.distribute import run_batch

        client = self.ensure_client()
        client.keygen()
        compiled = self.ensure_compiled()
        if batch_size > 1:
            if batch_size not in self.batched:  # compiled (or loaded from the cache) once per size
                cc = dataclasses.replace(self.compile_config or self.saved.config.compile, batch_size=batch_size)
                circuit = compile_model(self.saved, cc, self.cache_dir, self.progress_text)
                self.batched[batch_size] = (circuit, FHEClient(circuit))
            compiled, batched = self.batched[batch_size]
            batched.share_keys(client)  # this predictor's current keys
            client = batched
        batch = run_batch(client, compiled.deployment_dir / "server.zip", self.features(images),
                          backend, scheduler, n_jobs, warm)
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
        y, ex = self.remote.predict(x)
        self._exchange = ex
        sizes = {"ciphertext_bytes": len(ex.ciphertext), "result_bytes": len(ex.result),
                 "eval_key_bytes": self.remote.evaluation_key_bytes}
        return y, ex.stages, sizes


def _wire(ex, totals: dict) -> dict:
    """What crossed to the service: totals so far, and the last exchange's excerpts."""
    return {"endpoint": ex.endpoint,
            "sent_bytes": totals.get("sent_bytes", 0) + len(ex.ciphertext),
            "received_bytes": totals.get("received_bytes", 0) + len(ex.result),
            "key_uploads": totals.get("key_uploads", 0) + ex.key_uploads,
            "ciphertext_hex": ex.ciphertext[:24].hex(" "), "result_hex": ex.result[:24].hex(" "),
            "ciphertext": ex.ciphertext, "result": ex.result}
