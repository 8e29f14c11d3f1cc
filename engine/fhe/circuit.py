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
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class CompiledModel:
    """A cache entry, loaded: the quantized module (clear), a simulator, and deployment files."""

    def __init__(self, path: Path, report: CircuitReport):
        self.path = path
        self.report = report

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


def _build_entry(saved: SavedModel, cc: CompileConfig, key: str, out: Path) -> CircuitReport:
    import torch
    from concrete.ml.deployment import FHEModelDev
    from concrete.ml.torch.compile import compile_brevitas_qat_model

    _thread_tag_stack()
    model = saved.load_torch()
    inputset = torch.from_numpy(saved.calibration_features(cc.inputset_size))
    if len(inputset) < cc.batch_size:
        raise ValueError(f"{saved.name} keeps {len(inputset)} calibration images: too few for batches of {cc.batch_size}")
    t0 = time.perf_counter()
    with _inputset_in_batches(cc.batch_size):
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
        input_shape=[cc.batch_size, int(inputset.shape[1])],
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

    Once the evaluation keys are with a server, :meth:`forget_evaluation_keys` keeps only the
    secret keys (about 40 KB instead of about 60 MB for the shipped circuit); encryption and
    decryption need nothing else. If a server loses the keys, :meth:`evaluation_keys` derives a
    fresh set from the same secret keys (a key generation's cost, no new secret).
    """

    def __init__(self, compiled: "CompiledModel | Path", key_dir: Path | None = None):
        from concrete.ml.deployment import FHEModelClient

        deployment_dir = compiled.deployment_dir if isinstance(compiled, CompiledModel) else Path(compiled)
        self.compiled_key = compiled.report.cache_key if isinstance(compiled, CompiledModel) else deployment_dir.name
        self.key_dir = Path(key_dir) / self.compiled_key if key_dir else None
        self._client = FHEModelClient(str(deployment_dir), key_dir=str(self.key_dir) if self.key_dir else None)
        self.keygen_s: float | None = None
        self._eval_keys: bytes | None = None
        self._secret_only = False

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
        return self.keygen_s is not None

    @property
    def _keys(self):
        return self._client.client._keys  # concrete's fhe.Keys (holds the native Keyset)

    def evaluation_keys(self) -> bytes:
        """Serialized evaluation (public) keys: what the server may hold."""
        self.keygen()
        if self._eval_keys is None:  # forgotten after an upload: derive a fresh set
            self._eval_keys = _evaluation_keys_for(self._keys._keyset, self._client.client.specs.program_info)
        return self._eval_keys

    def forget_evaluation_keys(self) -> int:
        """Keep only the secret keys in memory; returns the bytes the remaining keyset takes."""
        from concrete.compiler import Keyset

        self.keygen()
        if not self._secret_only:
            self._keys._keyset = Keyset.deserialize(secret_only_keyset(self._keys._keyset.serialize()))
            self._secret_only = True
        self._eval_keys = None
        release_memory()
        return len(self._keys._keyset.serialize())

    def secret_keyset(self) -> bytes:
        """The serialized keyset without evaluation keys (what :meth:`adopt_secret_keys` takes)."""
        self.forget_evaluation_keys()
        return self._keys._keyset.serialize()

    def adopt_secret_keys(self, keyset: bytes, keygen_s: float = 0.0) -> None:
        """Use secret keys generated elsewhere (by the same circuit's client, in another process)."""
        from concrete.compiler import Keyset

        self._keys._keyset = Keyset.deserialize(keyset)
        self._secret_only = True
        self._eval_keys = None
        self.keygen_s = keygen_s

    @cached_property
    def batch_size(self) -> int:
        """Images per encrypted call: the circuit's first input dimension."""
        circuit = self._client.client.specs.program_info.get_circuits()[0]
        return int(circuit.get_inputs()[0].get_raw_info().get_shape()[0])

    def _keyset_info(self) -> bytes:
        return self._client.client.specs.program_info.get_keyset_info().serialize()

    def share_keys(self, other: "FHEClient") -> None:
        """Use ``other``'s keys: circuits of one model at different batch sizes have the same
        key parameters, so one key set (and one upload to a server) serves them all."""
        if self._keyset_info() != other._keyset_info():
            raise ValueError("these circuits need different keys (their key parameters differ)")
        other.keygen()
        self._client.client.keys = other._client.client.keys
        self._eval_keys, self._secret_only, self.keygen_s = other._eval_keys, other._secret_only, 0.0

    def encrypt(self, x: np.ndarray) -> bytes:
        """Features of up to ``batch_size`` images (n, F) -> quantized, encrypted, serialized.

        A batched circuit always takes ``batch_size`` images: a shorter batch is padded with
        blank images, whose results :meth:`decrypt` returns too (keep the first n rows)."""
        self.keygen()
        if len(x) > self.batch_size:
            raise ValueError(f"{len(x)} images for a circuit of {self.batch_size} per call")
        if len(x) < self.batch_size:
            x = np.concatenate([x, np.zeros((self.batch_size - len(x), *x.shape[1:]), x.dtype)])
        return self._client.quantize_encrypt_serialize(x)

    def decrypt(self, result: bytes, n: int | None = None) -> np.ndarray:
        """Serialized encrypted output -> dequantized logits (n, C): the first ``n`` images of the
        call (all ``batch_size`` by default; the rest are padding)."""
        logits = np.asarray(self._client.deserialize_decrypt_dequantize(result), dtype=np.float64)
        return logits.reshape(self.batch_size, -1)[:n]


def secret_only_keyset(keyset_bytes: bytes) -> bytes:
    """A serialized concrete ``Keyset`` with its server (evaluation) part removed.

    The keyset is a Cap'n Proto message whose root struct holds two pointers, ``server`` then
    ``client``. Nulling the first pointer leaves a valid message whose server keyset is empty;
    re-serializing it after :meth:`Keyset.deserialize` drops the evaluation keys' bytes.
    """
    import struct

    from concrete.compiler import Keyset

    n_segments = struct.unpack_from("<I", keyset_bytes, 0)[0] + 1
    header = 4 * (1 + n_segments)
    header += header % 8  # the segment table is padded to a whole word
    root = struct.unpack_from("<Q", keyset_bytes, header)[0]
    if root & 3 != 0 or (root >> 48) != 2:  # a struct pointer with exactly two pointer fields
        raise ValueError("unexpected keyset layout: cannot separate the secret keys")
    offset = (root & 0xFFFFFFFF) >> 2  # signed 30-bit word offset from the end of the pointer
    first = header + 8 * (1 + offset + (root >> 32 & 0xFFFF))  # skip the struct's data words
    buf = bytearray(keyset_bytes)
    buf[first : first + 8] = bytes(8)
    return Keyset.deserialize(bytes(buf)).serialize()


def _evaluation_keys_for(keyset, program_info) -> bytes:
    """Fresh evaluation keys for the secret keys in ``keyset`` (the client's keys stay the same)."""
    from concrete import fhe
    from concrete.compiler import Keyset

    secrets = {i: k for i, k in enumerate(keyset.get_client_keys().get_secret_keys())}
    full = Keyset(program_info, None, 0, 0, 0, 0, secrets)
    return fhe.EvaluationKeys(full.get_server_keys()).serialize()


@lru_cache(maxsize=1)
def _openmp():
    """The OpenMP runtime that Concrete's compiled circuits run their loops on (None if absent)."""
    import ctypes
    import glob

    import concrete

    for root in concrete.__path__:
        for path in sorted(glob.glob(str(Path(root).parent / "concrete_python.libs" / "libomp*.so*"))):
            return ctypes.CDLL(path)  # the library already loaded by Concrete: the same handle
    return None


def set_run_threads(n: int) -> int:
    """Threads that Concrete runs started from the calling thread may use; returns the setting
    in force (0 if Concrete's OpenMP runtime is not found).

    OpenMP keeps this per thread. One run spread over 2 cores takes 0.30 s of wall time and
    0.59 s of CPU; on one core, 0.44 s and 0.44 s (shipped PneumoniaMNIST circuit). Spreading a
    lone run answers sooner; runs side by side, one core each, answer more per second."""
    omp = _openmp()
    if omp is None:
        return 0
    omp.omp_set_num_threads(max(1, int(n)))
    return int(omp.omp_get_max_threads())


def release_memory() -> None:
    """Return freed memory to the system: concrete's key buffers stay mapped until glibc trims."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


class FHEServer:
    """The model owner's side: runs the circuit on ciphertexts with evaluation keys only.

    A client registers its serialized evaluation keys once (``register``) and then sends only
    ciphertexts with the returned key id, as a deployed service would: deserializing the keys
    on every request would cost more than the circuit itself. (The HTTP service keeps its keys
    in a byte-bounded :class:`engine.keystore.KeyStore` instead and calls :meth:`load_keys` and
    :meth:`execute` directly.)
    """

    MAX_CLIENTS = 16

    def __init__(self, deployment_dir: Path, library: Path | None = None):
        import threading
        from collections import OrderedDict

        from concrete.compiler import Library, ServerProgram

        # ``library``: the circuit compiled to a shared library (``library.zip`` of the warm-up
        # material). Loaded with concrete-compiler's own runtime, the layer under
        # concrete-python's ``fhe.Server`` (what concrete-ml's FHEModelServer wraps):
        # ``concrete.fhe`` imports torch, 457 MiB in an empty process against 108 MiB for
        # ``concrete.compiler`` alone, so a serving process never imports concrete-python,
        # concrete-ml, torch or medmnist. Without it, concrete-ml's ``server.zip`` (saved as MLIR)
        # is compiled here by concrete-python.
        self._dir = Path(tempfile.mkdtemp(prefix="engine-server-"))
        if library is None:
            from concrete import fhe

            built = fhe.Server.load(Path(deployment_dir) / "server.zip")
            shutil.copytree(built._library.get_output_dir_path(), self._dir, dirs_exist_ok=True)  # noqa: SLF001
        else:
            shutil.unpack_archive(str(library), str(self._dir), "zip")
        self._library = Library(str(self._dir))
        circuits = self._library.get_program_info().get_circuits()
        if len(circuits) != 1:
            raise ValueError(f"{deployment_dir}: expected one circuit, found {len(circuits)}")
        self._circuit = ServerProgram(self._library, False).get_server_circuit(circuits[0].get_name())
        self._keys: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    @staticmethod
    def load_keys(evaluation_keys: bytes):
        """Deserialize evaluation keys, refusing anything that does not round-trip exactly."""
        from concrete.compiler import ServerKeyset

        keys = ServerKeyset.deserialize(evaluation_keys)
        if keys.serialize() != evaluation_keys:
            raise ValueError("evaluation keys do not round-trip: malformed")
        return keys

    @staticmethod
    def check_ciphertext(ciphertext: bytes) -> None:
        """Raise ``ValueError`` unless ``ciphertext`` is a well-formed serialized value."""
        from concrete.compiler import TransportValue

        if TransportValue.deserialize(ciphertext).serialize() != ciphertext:
            raise ValueError("ciphertext does not round-trip: malformed")

    def execute(self, ciphertext: bytes, keys) -> bytes:
        """Run the circuit on one serialized ciphertext with deserialized evaluation keys."""
        from concrete.compiler import TransportValue

        (result,) = self._circuit.call([TransportValue.deserialize(ciphertext)], keys)
        return result.serialize()

    @staticmethod
    def key_id(evaluation_keys: bytes) -> str:
        """The id :meth:`register` gives these keys."""
        return hashlib.sha256(evaluation_keys).hexdigest()[:32]

    def holds(self, key_id: str) -> bool:
        with self._lock:
            return key_id in self._keys

    def register(self, evaluation_keys: bytes) -> str:
        """Keep a client's deserialized evaluation keys; returns the id to run with."""
        key_id = self.key_id(evaluation_keys)
        with self._lock:
            if key_id in self._keys:
                self._keys.move_to_end(key_id)
                return key_id
        keys = self.load_keys(evaluation_keys)
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
            keys = self.load_keys(evaluation_keys)
        return self.execute(ciphertext, keys)


# --------------------------------------------------------------------------- warm-up material

WARMUP_DIR = "warmup"


@dataclass
class WarmUp:
    """What a server needs besides ``server.zip``: material made under a throwaway key.

    ``ciphertext`` warms a client's keys at registration (the first run with a new key set is
    the slow one). The structure checks compare an upload's 8-byte words at the positions that
    are the same in every well-formed evaluation key set (resp. ciphertext) of this circuit: the
    Cap'n Proto structure and the parameters; the other words are key or ciphertext material.
    An upload whose structure words differ is refused before Concrete reads it, so a forged
    parameter cannot make the runtime read out of bounds. Only those few words are kept in
    memory; the throwaway evaluation keys stay on disk (``keys_path``).
    """

    ciphertext: bytes
    keys_path: Path
    key_bytes: int
    key_index: np.ndarray  # positions (in words) of the structure words
    key_values: np.ndarray
    ciphertext_index: np.ndarray
    ciphertext_values: np.ndarray

    @property
    def evaluation_keys(self) -> bytes:
        return self.keys_path.read_bytes()

    @property
    def library(self) -> Path:
        """The circuit compiled to a shared library, for :class:`FHEServer`."""
        return self.keys_path.parent / "library.zip"

    def keys_fit(self, candidate: bytes) -> bool:
        return _same_structure(self.key_bytes, self.key_index, self.key_values, candidate)

    def ciphertext_fits(self, candidate: bytes) -> bool:
        return _same_structure(len(self.ciphertext), self.ciphertext_index, self.ciphertext_values, candidate)


def _same_structure(size: int, index: np.ndarray, values: np.ndarray, candidate: bytes) -> bool:
    if len(candidate) != size or size % 8:
        return False
    return bool(np.array_equal(np.frombuffer(candidate, "<u8")[index], values))


def structure_mask(a: bytes, b: bytes) -> np.ndarray:
    """Words equal in two independent samples: structure (random words differ but for 2^-64)."""
    return np.frombuffer(a, "<u8") == np.frombuffer(b, "<u8")


WARMUP_FILES = ("ciphertext.bin", "evaluation_keys.bin", "key_mask.npy", "ciphertext_mask.npy", "library.zip")


def warmup_material(compiled: CompiledModel) -> WarmUp:
    """The circuit's :class:`WarmUp`, made once in a separate process and cached in its entry.

    The throwaway secret key never leaves that process, so a server holds no secret key at all.
    """
    folder = compiled.path / WARMUP_DIR
    if not all((folder / f).exists() for f in WARMUP_FILES):
        import multiprocessing as mp

        shutil.rmtree(folder, ignore_errors=True)
        tmp = compiled.path / f".{WARMUP_DIR}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            proc = mp.get_context("spawn").Process(target=_make_warmup, args=(str(compiled.deployment_dir), str(tmp),
                                                                             compiled.report.input_shape))
            proc.start()
            proc.join()
            if proc.exitcode != 0 or not all((tmp / f).exists() for f in WARMUP_FILES):
                raise RuntimeError(f"warm-up key generation failed (exit code {proc.exitcode})")
            try:
                tmp.rename(folder)
            except OSError:  # another process made it first
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    ct, keys_path = (folder / "ciphertext.bin").read_bytes(), folder / "evaluation_keys.bin"
    keys = keys_path.read_bytes()
    key_index = np.flatnonzero(np.load(folder / "key_mask.npy"))
    ct_index = np.flatnonzero(np.load(folder / "ciphertext_mask.npy"))
    return WarmUp(ct, keys_path, len(keys), key_index, np.frombuffer(keys, "<u8")[key_index].copy(),
                  ct_index, np.frombuffer(ct, "<u8")[ct_index].copy())


def _make_warmup(deployment_dir: str, out: str, input_shape: list[int]) -> None:
    from concrete.ml.deployment import FHEModelClient

    client = FHEModelClient(deployment_dir)
    client.generate_private_and_evaluation_keys()
    keys = client.get_serialized_evaluation_keys()
    # A second, independent key set for the same secret, and a second ciphertext: what differs
    # between the two samples is key or ciphertext material, what is equal is structure.
    other_keys = _evaluation_keys_for(client.client.keys._keyset, client.client.specs.program_info)
    ct = client.quantize_encrypt_serialize(np.zeros(input_shape, np.float32))
    other_ct = client.quantize_encrypt_serialize(np.full(input_shape, 0.5, np.float32))
    np.save(Path(out) / "key_mask.npy", structure_mask(keys, other_keys))
    np.save(Path(out) / "ciphertext_mask.npy", structure_mask(ct, other_ct))
    (Path(out) / "ciphertext.bin").write_bytes(ct)
    (Path(out) / "evaluation_keys.bin").write_bytes(keys)
    # The circuit as concrete-python compiles it from concrete-ml's MLIR: a server loads this
    # shared library with concrete-compiler alone (see FHEServer).
    from concrete import fhe

    built = fhe.Server.load(Path(deployment_dir) / "server.zip")
    shutil.make_archive(str(Path(out) / "library"), "zip", built._library.get_output_dir_path())  # noqa: SLF001
