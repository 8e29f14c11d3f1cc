"""Compile a saved model to a TFHE circuit and cache it on disk.

Cache entry ``<cache_dir>/circuits/<key>/`` (key = model hash + compile config + concrete-ml
version) holds:

- ``deployment/``: ``FHEModelDev`` artifacts (``client.zip``, ``server.zip``);
- ``quantized_module.json``: the quantized module, for clear quantized inference;
- ``report.json``: compile figures and a sha256 of every file, written last.

Entries are built in a temporary folder and renamed into place, so a reader never sees a
partial entry and two processes compiling the same key both end with a valid one. An entry that
fails its checksums or does not load is removed and rebuilt.

The client's keys are :mod:`engine.fhe.keys`, the server's runtime :mod:`engine.fhe.runtime`,
the simulator :mod:`engine.fhe.simulate`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import CompileConfig, default_cache_dir
from ..learn.registry import SavedModel
from .simulate import Simulator, thread_tag_stack

ENTRY_FILES = ("deployment/client.zip", "deployment/server.zip", "quantized_module.json")
# A model's folder may carry its circuit (``python -m engine compile --ship``, :func:`engine.fhe.runtime.ship`): the portable part
# of a cache entry (the MLIR, the quantization, the report) with the warm-up structure words, a
# warm-up ciphertext and the measured key-set memory. A fresh clone then compiles nothing and
# generates no throwaway key at start; the shared library is still built on the machine.
SHIPPED_DIR = "circuit"
SHIPPED_FILES = ENTRY_FILES + ("report.json", "warmup/ciphertext.bin", "warmup/structure.json", "warmup/footprint.json")


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"concrete-ml": version("concrete-ml"), "concrete-python": version("concrete-python")}


def cache_key(model_hash: str, cc: CompileConfig) -> str:
    settings = dataclasses.asdict(cc)
    if settings["batch_size"] == 1:  # 1-image circuits keep the keys they had before batching existed
        del settings["batch_size"]
    payload = json.dumps({"model": model_hash, "compile": settings, "versions": _versions()}, sort_keys=True)
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
    complexity: float | None = None  # Concrete's cost estimate of one run (entries made before it: None)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class CompiledModel:
    """A cache entry, loaded: the quantized module (clear), a simulator, and deployment files."""

    def __init__(self, path: Path, report: CircuitReport):
        self.path = path
        self.report = report

    @cached_property
    def complexity(self) -> float:
        """Concrete's cost estimate of one run (what its optimizer minimises): the report's, else
        read from the server program (entries compiled before the report kept it)."""
        if self.report.complexity is not None:
            return self.report.complexity
        from concrete import fhe

        return float(fhe.Server.load(self.deployment_dir / "server.zip").complexity)

    @cached_property
    def program(self) -> str:
        """The circuit's MLIR: two settings that give the same text (and ``p_error``) give the same circuit."""
        import zipfile

        with zipfile.ZipFile(self.deployment_dir / "server.zip") as z:
            return z.read("circuit.mlir").decode()

    @cached_property
    def quantized(self):
        """The quantized module (loaded on first use: the service never needs it)."""
        from concrete.ml.common.serialization.loaders import load

        with open(self.path / "quantized_module.json", encoding="utf-8") as f:
            return load(f)

    @property
    def deployment_dir(self) -> Path:
        return self.path / "deployment"

    @property
    def batch_size(self) -> int:
        """Images per encrypted call (the circuit's first input dimension)."""
        return int(self.report.input_shape[0])

    @cached_property
    def simulator(self) -> Simulator:
        return Simulator(self.deployment_dir / "server.zip")

    def quantize(self, x: np.ndarray) -> np.ndarray:
        return self.quantized.quantize_input(x)

    def dequantize(self, q_y: np.ndarray) -> np.ndarray:
        return self.quantized.dequantize_output(q_y)

    def run_clear(self, x: np.ndarray) -> np.ndarray:
        """Quantized inference in the clear (``fhe="disable"``): same integers as the circuit."""
        thread_tag_stack()
        return self.quantized.forward(x, fhe="disable")


class CacheError(Exception):
    """A cache entry is missing, partial or corrupt."""


class BatchedCircuitError(ValueError):
    """A circuit compiled for several images per call does not compute what the model does."""


# A batched circuit must give the clear model's answer on at least this share of the calibration
# images, run in simulation a batch at a time (measured: 54.7% for one 260-input model at batches
# of 32, and 72% at batches of 4, while its 1-image circuit agreed on 100%).
MIN_BATCHED_AGREEMENT = 0.99
BATCH_CHECK_IMAGES = 128


def batched_agreement(compiled: "CompiledModel", x: np.ndarray) -> float:
    """Share of the rows of ``x`` (features) on which the batched circuit, simulated a batch at a
    time, gives the clear quantized model's answer (the largest output)."""
    b = compiled.batch_size
    x = x[: (len(x) // b) * b]
    clear = compiled.run_clear(x)
    sim = np.concatenate([compiled.dequantize(compiled.simulator.run(compiled.quantize(x[i:i + b])))
                          for i in range(0, len(x), b)])
    return float((clear.argmax(axis=1) == sim.argmax(axis=1)).mean())


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_entry(path: Path) -> CompiledModel:
    """Load and verify a cache entry; raise :class:`CacheError` if anything is off."""
    try:
        report = CircuitReport(**json.loads((path / "report.json").read_text()))
        report.compile = CompileConfig.settings(report.compile)  # entries from before batch_size
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
    shipped = shipped_entry(saved, cc)
    if shipped is not None and not force:
        try:
            return _adopt_shipped(shipped, root, key, say)
        except CacheError as exc:
            say(f"the circuit shipped with the model is unusable, compiling ({exc})")

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        say("compiling to a TFHE circuit")
        report = _build_entry(saved, cc, key, tmp)
        if cc.batch_size > 1:  # checked before it is published: a wrong circuit never enters the cache
            say(f"checking the circuit for {cc.batch_size} images per call in simulation")
            x = saved.calibration_features(max(BATCH_CHECK_IMAGES, 2 * cc.batch_size))
            agree = batched_agreement(CompiledModel(tmp, report), x)
            if agree < MIN_BATCHED_AGREEMENT:
                raise BatchedCircuitError(
                    f"{saved.dataset}/{saved.name}: its circuit for {cc.batch_size} images per call gives the model's "
                    f"answer on only {100 * agree:.1f}% of {len(x) // cc.batch_size * cc.batch_size} calibration images "
                    f"in simulation (its 1-image circuit is unaffected): serve it one image per call")
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


@contextmanager
def _inputset_in_batches(batch_size: int):
    """Concrete ML traces its circuit on the input set one image at a time (a (1, F) input).
    For a batched circuit, hand the tracer ``batch_size`` images at a time instead: the circuit
    then takes (B, F). Quantization is calibrated on the whole input set either way, so a
    batched circuit computes, image by image, the same integers as the 1-image circuit."""
    if batch_size == 1:
        yield
        return
    from unittest import mock

    import concrete.ml.quantization.quantized_module as qmodule

    def batches(q_inputs):
        (q,) = q_inputs if isinstance(q_inputs, tuple) else (q_inputs,)
        return (q[i : i + batch_size] for i in range(0, len(q) - batch_size + 1, batch_size))

    with mock.patch.object(qmodule, "_get_inputset_generator", batches):
        yield


def compile_options(cc: CompileConfig) -> dict:
    """Concrete ML's compile arguments for ``cc``: never without ``rounding_threshold_bits``
    (Concrete sizes the whole circuit by its widest integer, accumulators included)."""
    return {"rounding_threshold_bits": {"n_bits": cc.rounding_threshold_bits, "method": cc.rounding_method},
            "p_error": cc.p_error}


def _build_entry(saved: SavedModel, cc: CompileConfig, key: str, out: Path) -> CircuitReport:
    import torch
    from concrete.ml.deployment import FHEModelDev
    from concrete.ml.torch.compile import compile_brevitas_qat_model

    thread_tag_stack()
    model = saved.load_torch()
    inputset = torch.from_numpy(saved.calibration_features(cc.inputset_size))
    if len(inputset) < cc.batch_size:
        raise ValueError(f"{saved.name} keeps {len(inputset)} calibration images: too few for batches of {cc.batch_size}")
    t0 = time.perf_counter()
    with _inputset_in_batches(cc.batch_size):
        qm = compile_brevitas_qat_model(model, inputset, **compile_options(cc))
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
        input_shape=[cc.batch_size, int(inputset.shape[1])],
        versions=_versions(),
        files={rel: _sha256(out / rel) for rel in ENTRY_FILES},
        complexity=float(circuit.complexity),
    )
    # report.json last: its presence with matching checksums marks a complete entry.
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report


def is_cached(saved: SavedModel, cc: CompileConfig | None = None, cache_dir: Path | None = None) -> bool:
    """Whether a complete entry for this model and config is on disk, in the cache or shipped
    with the model (not verified)."""
    cc = cc or saved.config.compile
    key = cache_key(saved.hash, cc)
    return (Path(cache_dir or default_cache_dir()) / "circuits" / key / "report.json").exists() \
        or shipped_entry(saved, cc) is not None


def shipped_entry(saved: SavedModel, cc: CompileConfig | None = None) -> Path | None:
    """The model folder's shipped circuit if it is the one for ``cc`` (and these versions)."""
    folder = Path(saved.path) / SHIPPED_DIR
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return None
    return folder if report.get("cache_key") == cache_key(saved.hash, cc or saved.config.compile) else None


def _adopt_shipped(folder: Path, root: Path, key: str, say: ProgressFn) -> CompiledModel:
    """Copy a shipped circuit into the cache (verified like any entry) and load it from there."""
    say("loading the compiled circuit shipped with the model")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    try:
        for rel in SHIPPED_FILES:
            if (folder / rel).exists():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / rel, tmp / rel)
        load_entry(tmp)  # checksums
        try:
            tmp.rename(root / key)
        except OSError:  # another process adopted it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_entry(root / key)
