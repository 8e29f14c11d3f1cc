"""Compile a saved model to a TFHE circuit, cache it on disk, and split client from server.

Cache entry ``<cache_dir>/circuits/<key>/`` (key = model hash + compile config + concrete-ml
version) holds:

- ``deployment/``: ``FHEModelDev`` artifacts (``client.zip``, ``server.zip``);
- ``quantized_module.json``: the quantized module, for clear quantized inference;
- ``report.json``: compile figures and a sha256 of every file, written last.

Entries are built in a temporary folder and renamed into place, so a reader never sees a
partial entry and two processes compiling the same key both end with a valid one. An entry that
fails its checksums or does not load is removed and rebuilt.

The secret key exists only inside :class:`FHEClient` (in memory, or its key folder);
:class:`FHEServer` is built from ``server.zip`` alone and is handed evaluation keys and
ciphertexts as bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np

from .config import CompileConfig, default_cache_dir
from .registry import SavedModel

ENTRY_FILES = ("deployment/client.zip", "deployment/server.zip", "quantized_module.json")


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"concrete-ml": version("concrete-ml"), "concrete-python": version("concrete-python")}


def cache_key(model_hash: str, cc: CompileConfig) -> str:
    payload = json.dumps(
        {"model": model_hash, "compile": dataclasses.asdict(cc), "versions": _versions()}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


@dataclass
class CircuitReport:
    cache_key: str
    model_hash: str
    compile: dict
    max_bit_width: int
    pbs_count: int
    compile_s: float
    input_shape: list[int]
    versions: dict
    files: dict[str, str] = field(default_factory=dict)
    from_cache: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class CompiledModel:
    """A cache entry, loaded: the quantized module (clear), a simulator, and deployment files."""

    def __init__(self, path: Path, report: CircuitReport):
        from concrete.ml.common.serialization.loaders import load

        self.path = path
        self.report = report
        with open(path / "quantized_module.json", encoding="utf-8") as f:
            self.quantized = load(f)

    @property
    def deployment_dir(self) -> Path:
        return self.path / "deployment"

    @cached_property
    def simulator(self) -> "Simulator":
        return Simulator(self.deployment_dir / "server.zip")

    def quantize(self, x: np.ndarray) -> np.ndarray:
        return self.quantized.quantize_input(x)

    def dequantize(self, q_y: np.ndarray) -> np.ndarray:
        return self.quantized.dequantize_output(q_y)

    def run_clear(self, x: np.ndarray) -> np.ndarray:
        """Quantized inference in the clear (``fhe="disable"``): same integers as the circuit."""
        _thread_tag_stack()
        return self.quantized.forward(x, fhe="disable")


def _thread_tag_stack() -> None:
    """Concrete's ``tag`` keeps a thread-local stack initialised only in the importing thread;
    clear inference from any other thread (Streamlit runs each session in its own) needs one."""
    import importlib

    tag_module = importlib.import_module("concrete.fhe.extensions.tag")  # the package re-exports tag()
    if not hasattr(tag_module.tag_context, "stack"):
        tag_module.tag_context.stack = []


class Simulator:
    """FHE simulation of exactly the circuit in ``server.zip`` (its MLIR, its configuration)."""

    def __init__(self, server_zip: Path):
        import jsonpickle
        from concrete import fhe

        with tempfile.TemporaryDirectory() as d:
            shutil.unpack_archive(server_zip, d, "zip")
            mlir = (Path(d) / "circuit.mlir").read_text(encoding="utf-8")
            options = jsonpickle.loads((Path(d) / "configuration.json").read_text(encoding="utf-8"))
        configuration = fhe.Configuration().fork(**options).fork(fhe_simulation=True)
        self._server = fhe.Server.create(mlir, configuration, is_simulated=True)
        self._client = fhe.Client(self._server.client_specs, is_simulated=True)

    def run(self, q_x: np.ndarray) -> np.ndarray:
        """Quantized input (1, F) -> quantized output (1, C), with simulated PBS noise."""
        return self._client.simulate_decrypt(self._server.run(self._client.simulate_encrypt(q_x)))


class CacheError(Exception):
    """A cache entry is missing, partial or corrupt."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_entry(path: Path) -> CompiledModel:
    """Load and verify a cache entry; raise :class:`CacheError` if anything is off."""
    try:
        report = CircuitReport(**json.loads((path / "report.json").read_text()))
        for rel in ENTRY_FILES:
            if _sha256(path / rel) != report.files.get(rel):
                raise CacheError(f"{path / rel}: checksum mismatch")
        compiled = CompiledModel(path, report)
    except CacheError:
        raise
    except Exception as exc:  # missing files, bad JSON, unreadable module: all mean "rebuild"
        raise CacheError(f"{path}: {type(exc).__name__}: {exc}") from exc
    report.from_cache = True
    return compiled


ProgressFn = Callable[[str], None]


def compile_model(
    saved: SavedModel,
    cc: CompileConfig | None = None,
    cache_dir: Path | None = None,
    progress: ProgressFn | None = None,
    force: bool = False,
) -> CompiledModel:
    """The compiled circuit of ``saved`` under ``cc``: from the cache, else compiled and cached."""
    cc = cc or saved.config.compile
    say = progress or (lambda _msg: None)
    key = cache_key(saved.hash, cc)
    root = Path(cache_dir or default_cache_dir()) / "circuits"
    final = root / key
    if final.exists() and not force:
        try:
            say("loading compiled circuit from cache")
            return load_entry(final)
        except CacheError as exc:
            say(f"cache entry unusable, rebuilding ({exc})")
            shutil.rmtree(final, ignore_errors=True)

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        say("compiling to a TFHE circuit")
        report = _build_entry(saved, cc, key, tmp)
        if force and final.exists():
            shutil.rmtree(final, ignore_errors=True)
        try:
            tmp.rename(final)
        except OSError:
            # Another process published the same key first: theirs is equivalent; use it.
            shutil.rmtree(tmp, ignore_errors=True)
            return load_entry(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    compiled = CompiledModel(final, report)
    return compiled


def _build_entry(saved: SavedModel, cc: CompileConfig, key: str, out: Path) -> CircuitReport:
    import torch
    from concrete.ml.deployment import FHEModelDev
    from concrete.ml.torch.compile import compile_brevitas_qat_model

    _thread_tag_stack()
    model = saved.load_torch()
    inputset = torch.from_numpy(saved.calibration_features(cc.inputset_size))
    t0 = time.perf_counter()
    qm = compile_brevitas_qat_model(
        model,
        inputset,
        rounding_threshold_bits={"n_bits": cc.rounding_threshold_bits, "method": cc.rounding_method},
        p_error=cc.p_error,
    )
    compile_s = time.perf_counter() - t0
    FHEModelDev(str(out / "deployment"), qm).save()
    with open(out / "quantized_module.json", "w", encoding="utf-8") as f:
        qm.dump(f)
    circuit = qm.fhe_circuit
    report = CircuitReport(
        cache_key=key,
        model_hash=saved.hash,
        compile=dataclasses.asdict(cc),
        max_bit_width=int(circuit.graph.maximum_integer_bit_width()),
        pbs_count=int(circuit.statistics["programmable_bootstrap_count"]),
        compile_s=round(compile_s, 3),
        input_shape=[1, int(inputset.shape[1])],
        versions=_versions(),
        files={rel: _sha256(out / rel) for rel in ENTRY_FILES},
    )
    # report.json last: its presence with matching checksums marks a complete entry.
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report


def is_cached(saved: SavedModel, cc: CompileConfig | None = None, cache_dir: Path | None = None) -> bool:
    """Whether a complete entry for this model and config is on disk (not verified)."""
    key = cache_key(saved.hash, cc or saved.config.compile)
    return (Path(cache_dir or default_cache_dir()) / "circuits" / key / "report.json").exists()


# --------------------------------------------------------------------------- client / server


class FHEClient:
    """The data owner's side: keys, quantize + encrypt, decrypt + dequantize.

    With ``key_dir`` the keys persist in that folder (the client's own); without it they live
    in memory only. Nothing here sends the secret key anywhere.
    """

    def __init__(self, compiled: CompiledModel, key_dir: Path | None = None):
        from concrete.ml.deployment import FHEModelClient

        self.compiled_key = compiled.report.cache_key
        self.key_dir = Path(key_dir) / self.compiled_key if key_dir else None
        self._client = FHEModelClient(str(compiled.deployment_dir), key_dir=str(self.key_dir) if self.key_dir else None)
        self.keygen_s: float | None = None
        self._eval_keys: bytes | None = None

    def keygen(self) -> float:
        """Generate (or load from ``key_dir``) the key pair; returns seconds spent."""
        if self.keygen_s is None:
            t0 = time.perf_counter()
            self._client.generate_private_and_evaluation_keys(force=False)
            self._eval_keys = self._client.get_serialized_evaluation_keys()
            self.keygen_s = time.perf_counter() - t0
        return self.keygen_s

    @property
    def has_keys(self) -> bool:
        return self._eval_keys is not None

    def evaluation_keys(self) -> bytes:
        """Serialized evaluation (public) keys: what the server may hold."""
        self.keygen()
        assert self._eval_keys is not None
        return self._eval_keys

    def encrypt(self, x: np.ndarray) -> bytes:
        """One image's features (1, F) -> quantized, encrypted, serialized."""
        self.keygen()
        return self._client.quantize_encrypt_serialize(x)

    def decrypt(self, result: bytes) -> np.ndarray:
        """Serialized encrypted output -> dequantized logits (1, C)."""
        return self._client.deserialize_decrypt_dequantize(result)


class FHEServer:
    """The model owner's side: runs the circuit on ciphertexts with evaluation keys only.

    A client registers its serialized evaluation keys once (``register``) and then sends only
    ciphertexts with the returned key id, as a deployed service would: deserializing the keys
    on every request would cost more than the circuit itself.
    """

    MAX_CLIENTS = 16

    def __init__(self, deployment_dir: Path):
        import threading
        from collections import OrderedDict

        from concrete.ml.deployment import FHEModelServer

        self._server = FHEModelServer(str(deployment_dir))
        self._keys: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def register(self, evaluation_keys: bytes) -> str:
        """Keep a client's deserialized evaluation keys; returns the id to run with."""
        from concrete import fhe

        key_id = hashlib.sha256(evaluation_keys).hexdigest()[:32]
        with self._lock:
            if key_id in self._keys:
                self._keys.move_to_end(key_id)
                return key_id
        keys = fhe.EvaluationKeys.deserialize(evaluation_keys)
        with self._lock:
            self._keys[key_id] = keys
            while len(self._keys) > self.MAX_CLIENTS:
                self._keys.popitem(last=False)
        return key_id

    def run(self, ciphertext: bytes, evaluation_keys: bytes | str) -> bytes:
        """Run on one serialized ciphertext with a registered key id (or the keys' bytes)."""
        if isinstance(evaluation_keys, str):
            with self._lock:
                keys = self._keys.get(evaluation_keys)
            if keys is None:
                raise KeyError("Unknown evaluation key id: register the client's evaluation keys first.")
        else:
            keys = evaluation_keys
        return self._server.run(ciphertext, keys)
