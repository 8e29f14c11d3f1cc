"""The model owner's runtime: the circuit run on ciphertexts with evaluation keys only.

:class:`FHEServer` is built from ``server.zip`` (or the compiled library) alone and is handed
evaluation keys and ciphertexts as bytes; the warm-up material is made under a throwaway key
in a separate process, so a server holds no secret key at all.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .circuit import SHIPPED_DIR, SHIPPED_FILES, CompiledModel
from .keys import evaluation_keys_for
from .threads import ignore_sigpipe


class FHEServer:
    """The model owner's side: runs the circuit on ciphertexts with evaluation keys only.

    A client registers its serialized evaluation keys once (``register``) and then sends only
    ciphertexts with the returned key id, as a deployed service would: deserializing the keys
    on every request would cost more than the circuit itself. (The HTTP service keeps its keys
    in a byte-bounded :class:`engine.serve.keystore.KeyStore` instead and calls :meth:`load_keys` and
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
        # A ServerCircuit is not reentrant: ``call`` passes the arguments and results through
        # buffers the object owns, so two runs on one object at once overwrite each other's
        # input and output, and free them twice (measured: 25 of 120 results wrong with two
        # clients on the shipped circuit; "double free or corruption" under a 2-client load
        # test). Each run takes a circuit of its own from ``_idle`` (copies made by the
        # program: 0.1 ms each).
        self._program = ServerProgram(self._library, False)
        self._circuit_name = circuits[0].get_name()
        self._idle = [self._program.get_server_circuit(self._circuit_name)]
        ignore_sigpipe()
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

        with self._lock:
            circuit = self._idle.pop() if self._idle else self._program.get_server_circuit(self._circuit_name)
        try:
            (result,) = circuit.call([TransportValue.deserialize(ciphertext)], keys)
        finally:
            with self._lock:
                self._idle.append(circuit)
        ignore_sigpipe()  # Concrete's runtime may have replaced it: see threads.ignore_sigpipe
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
    parameter cannot make the runtime read out of bounds. Only those few words are kept
    (``structure.json``, a few hundred bytes: it ships with a model, see
    :func:`engine.fhe.circuit.ship`); the throwaway evaluation keys, when they were made on
    this machine, stay on disk (``keys_path``) for the memory measurement.
    """

    folder: Path
    ciphertext: bytes
    key_bytes: int
    key_index: np.ndarray  # positions (in words) of the structure words
    key_values: np.ndarray
    ciphertext_index: np.ndarray
    ciphertext_values: np.ndarray

    @property
    def keys_path(self) -> Path:
        return self.folder / "evaluation_keys.bin"

    @property
    def evaluation_keys(self) -> bytes:
        return self.keys_path.read_bytes()

    @property
    def library(self) -> Path:
        """The circuit compiled to a shared library, for :class:`FHEServer`."""
        return self.folder / "library.zip"

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


# Made together under one throwaway key (in a separate process); ``structure.json`` is derived
# from them, and with ``ciphertext.bin`` (and ``footprint.json``) is all a shipped circuit carries.
WARMUP_FILES = ("ciphertext.bin", "evaluation_keys.bin", "key_mask.npy", "ciphertext_mask.npy")
STRUCTURE_FILE = "structure.json"
LIBRARY_FILE = "library.zip"


def _in_child(target, *args) -> None:
    import multiprocessing as mp

    proc = mp.get_context("spawn").Process(target=target, args=args)
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"{target.__name__} failed in its process (exit code {proc.exitcode})")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    tmp.replace(path)


def _structure_from_samples(folder: Path) -> None:
    """``structure.json`` from the throwaway key's samples and masks."""
    import json

    keys = np.frombuffer((folder / "evaluation_keys.bin").read_bytes(), "<u8")
    ct = np.frombuffer((folder / "ciphertext.bin").read_bytes(), "<u8")
    k_index = np.flatnonzero(np.load(folder / "key_mask.npy"))
    c_index = np.flatnonzero(np.load(folder / "ciphertext_mask.npy"))
    _write_atomic(folder / STRUCTURE_FILE, json.dumps({
        "key_bytes": int(keys.nbytes), "key_index": k_index.tolist(), "key_values": [int(v) for v in keys[k_index]],
        "ciphertext_index": c_index.tolist(), "ciphertext_values": [int(v) for v in ct[c_index]],
    }).encode())


def warmup_material(compiled: CompiledModel, samples: bool = False, say=lambda _m: None) -> WarmUp:
    """The circuit's :class:`WarmUp`, cached in its entry. What is missing is made in a separate
    process: the throwaway key's samples (unless the entry came with its structure, as a shipped
    circuit does), and the shared library (built on this machine, never shipped).

    ``samples``: make the throwaway evaluation keys too (to measure what a key set takes in memory).
    The throwaway secret key never leaves that process, so a server holds no secret key at all.
    """
    import json

    folder = compiled.path / WARMUP_DIR
    folder.mkdir(exist_ok=True)
    if samples or not (folder / STRUCTURE_FILE).exists() or not (folder / "ciphertext.bin").exists():
        if not all((folder / f).exists() for f in WARMUP_FILES):
            say("making the warm-up material under a throwaway key (in a separate process)")
            tmp = compiled.path / f".{WARMUP_DIR}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                _in_child(_make_warmup, str(compiled.deployment_dir), str(tmp), compiled.report.input_shape)
                for f in WARMUP_FILES:
                    (tmp / f).replace(folder / f)  # ciphertext.bin last but one; the keys last
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        _structure_from_samples(folder)
    if not (folder / LIBRARY_FILE).exists():
        say("building the circuit's library for this machine (in a separate process)")
        tmp = folder / f".library-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _in_child(_make_library, str(compiled.deployment_dir), str(tmp))
            (tmp / LIBRARY_FILE).replace(folder / LIBRARY_FILE)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    st = json.loads((folder / STRUCTURE_FILE).read_text())
    return WarmUp(folder, (folder / "ciphertext.bin").read_bytes(), int(st["key_bytes"]),
                  np.asarray(st["key_index"], np.int64), np.asarray(st["key_values"], np.uint64),
                  np.asarray(st["ciphertext_index"], np.int64), np.asarray(st["ciphertext_values"], np.uint64))


def _make_library(deployment_dir: str, out: str) -> None:
    """The circuit as concrete-python compiles it from concrete-ml's MLIR: a server loads this
    shared library with concrete-compiler alone (see FHEServer). Native code for this machine."""
    from concrete import fhe

    built = fhe.Server.load(Path(deployment_dir) / "server.zip")
    shutil.make_archive(str(Path(out) / "library"), "zip", built._library.get_output_dir_path())  # noqa: SLF001


def _make_warmup(deployment_dir: str, out: str, input_shape: list[int]) -> None:
    from concrete.ml.deployment import FHEModelClient

    client = FHEModelClient(deployment_dir)
    client.generate_private_and_evaluation_keys()
    keys = client.get_serialized_evaluation_keys()
    # A second, independent key set for the same secret, and a second ciphertext: what differs
    # between the two samples is key or ciphertext material, what is equal is structure.
    other_keys = evaluation_keys_for(client.client.keys._keyset, client.client.specs.program_info)
    ct = client.quantize_encrypt_serialize(np.zeros(input_shape, np.float32))
    other_ct = client.quantize_encrypt_serialize(np.full(input_shape, 0.5, np.float32))
    np.save(Path(out) / "key_mask.npy", structure_mask(keys, other_keys))
    np.save(Path(out) / "ciphertext_mask.npy", structure_mask(ct, other_ct))
    (Path(out) / "ciphertext.bin").write_bytes(ct)
    (Path(out) / "evaluation_keys.bin").write_bytes(keys)


def ship(compiled: CompiledModel, saved) -> Path:
    """Write ``compiled``'s portable part into ``saved``'s folder (see :data:`SHIPPED_DIR`);
    the warm-up material is made first if the entry has none."""
    warmup_material(compiled)
    out = Path(saved.path) / SHIPPED_DIR
    tmp = Path(saved.path) / f".{SHIPPED_DIR}-{uuid.uuid4().hex[:8]}"
    try:
        for rel in SHIPPED_FILES:
            if (compiled.path / rel).exists():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(compiled.path / rel, tmp / rel)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
