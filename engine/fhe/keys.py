"""The data owner's keys: generate, quantize + encrypt, decrypt + dequantize.

The secret key exists only inside :class:`FHEClient` (in memory, or its key folder); nothing
here sends it anywhere.
"""

from __future__ import annotations

import time
from functools import cached_property
from pathlib import Path

import numpy as np

from .circuit import CompiledModel
from .threads import release_memory


class FHEClient:
    """The data owner's side: keys, quantize + encrypt, decrypt + dequantize.

    With ``key_dir`` the keys persist in that folder (the client's own); without it they live
    in memory only. Nothing here sends the secret key anywhere.

    Once the evaluation keys are with a server, :meth:`forget_evaluation_keys` keeps only the
    secret keys (about 40 KB instead of about 60 MB for the shipped circuit); encryption and
    decryption need nothing else. If a server loses the keys, :meth:`evaluation_keys` derives a
    fresh set from the same secret keys (a key generation's cost, no new secret).

    Built on Concrete's compiler runtime alone (``concrete.compiler``, as the server is): it
    reads the circuit's ``client.zip`` (the program's key and encoding specs, and concrete-ml's
    input and output quantizers) and does what concrete-ml's ``FHEModelClient`` does with them,
    without importing concrete-ml, torch or concrete-python (about 0.2 s instead of about 4 s:
    the first encrypted answer after a start waits for this import). ``tests/test_fhe.py``
    checks that both give the same integers, ciphertexts that decrypt alike, and the same logits.
    """

    def __init__(self, compiled: "CompiledModel | Path", key_dir: Path | None = None):
        from concrete.compiler import KeysetCache

        deployment_dir = compiled.deployment_dir if isinstance(compiled, CompiledModel) else Path(compiled)
        self.compiled_key = compiled.report.cache_key if isinstance(compiled, CompiledModel) else deployment_dir.name
        self.key_dir = Path(key_dir) / self.compiled_key if key_dir else None
        self.program_info, self._in_q, self._out_q = read_client_zip(deployment_dir / "client.zip")
        self._function = self.program_info.function_list()[0]
        # The same key cache concrete-python keeps in a key folder: keys saved by either client load in both.
        self._cache = KeysetCache(str(self.key_dir)) if self.key_dir else None
        self._keyset = None
        self.keygen_s: float | None = None
        self._eval_keys: bytes | None = None
        self._secret_only = False

    def keygen(self) -> float:
        """Generate (or load from ``key_dir``) the key pair; returns seconds spent."""
        if self.keygen_s is None:
            from concrete.compiler import Keyset

            t0 = time.perf_counter()
            if self._keyset is None:
                # Seeds 0: fresh randomness (concrete-python's default); with a cache, the folder's keys.
                self._keyset = Keyset(self.program_info, self._cache, 0, 0, 0, 0, None)
            self._eval_keys = self._keyset.get_server_keys().serialize()
            self.keygen_s = time.perf_counter() - t0
        return self.keygen_s

    @property
    def has_keys(self) -> bool:
        return self.keygen_s is not None

    def evaluation_keys(self) -> bytes:
        """Serialized evaluation (public) keys: what the server may hold."""
        self.keygen()
        if self._eval_keys is None:  # forgotten after an upload: derive a fresh set
            self._eval_keys = evaluation_keys_for(self._keyset, self.program_info)
        return self._eval_keys

    def forget_evaluation_keys(self) -> int:
        """Keep only the secret keys in memory; returns the bytes the remaining keyset takes."""
        from concrete.compiler import Keyset

        self.keygen()
        if not self._secret_only:
            self._keyset = Keyset.deserialize(secret_only_keyset(self._keyset.serialize()))
            self._secret_only = True
        self._eval_keys = None
        release_memory()
        return len(self._keyset.serialize())

    def secret_keyset(self) -> bytes:
        """The serialized keyset without evaluation keys (what :meth:`adopt_secret_keys` takes)."""
        self.forget_evaluation_keys()
        return self._keyset.serialize()

    def adopt_secret_keys(self, keyset: bytes, keygen_s: float = 0.0) -> None:
        """Use secret keys generated elsewhere (by the same circuit's client, in another process)."""
        from concrete.compiler import Keyset

        self._keyset = Keyset.deserialize(keyset)
        self._secret_only = True
        self._eval_keys = None
        self.keygen_s = keygen_s

    @cached_property
    def input_shape(self) -> tuple[int, ...]:
        """The circuit's integer input (batch, features): the raw shape without its ciphertext axis."""
        return tuple(int(d) for d in self.program_info.get_circuits()[0].get_inputs()[0].get_raw_info().get_shape()[:-1])

    @property
    def batch_size(self) -> int:
        """Images per encrypted call: the circuit's first input dimension."""
        return self.input_shape[0]

    def _keyset_info(self) -> bytes:
        return self.program_info.get_keyset_info().serialize()

    def share_keys(self, other: "FHEClient") -> None:
        """Use ``other``'s keys: circuits of one model at different batch sizes have the same
        key parameters, so one key set (and one upload to a server) serves them all."""
        if self._keyset_info() != other._keyset_info():
            raise ValueError("these circuits need different keys (their key parameters differ)")
        other.keygen()
        self._keyset = other._keyset
        self._eval_keys, self._secret_only, self.keygen_s = other._eval_keys, other._secret_only, 0.0

    def _circuit(self):
        from concrete.compiler import ClientProgram

        return ClientProgram.create_encrypted(self.program_info, self._keyset).get_client_circuit(self._function)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Float features -> the circuit's integer inputs (concrete-ml's input quantizer)."""
        return self._in_q.quant(np.asarray(x))

    def encrypt(self, x: np.ndarray) -> bytes:
        """Features of up to ``batch_size`` images (n, F) -> quantized, encrypted, serialized.

        A batched circuit always takes ``batch_size`` images: a shorter batch is padded with
        blank images, whose results :meth:`decrypt` returns too (keep the first n rows)."""
        from concrete.compiler import Value

        self.keygen()
        if len(x) > self.batch_size:
            raise ValueError(f"{len(x)} images for a circuit of {self.batch_size} per call")
        if len(x) < self.batch_size:
            x = np.concatenate([x, np.zeros((self.batch_size - len(x), *x.shape[1:]), x.dtype)])
        q = self.quantize(x)
        if q.shape != self.input_shape:
            raise ValueError(f"features of shape {q.shape} for a circuit that takes {self.input_shape}")
        return self._circuit().prepare_input(Value(q.astype(np.int64)), 0).serialize()

    def decrypt(self, result: bytes, n: int | None = None) -> np.ndarray:
        """Serialized encrypted output -> dequantized logits (n, C): the first ``n`` images of the
        call (all ``batch_size`` by default; the rest are padding)."""
        from concrete.compiler import TransportValue

        q = np.asarray(self._circuit().process_output(TransportValue.deserialize(result), 0).to_py_val()).astype(np.int64)
        logits = np.asarray(self._out_q.dequant(q), dtype=np.float64)
        return logits.reshape(self.batch_size, -1)[:n]


class _Quantizer:
    """concrete-ml's ``UniformQuantizer`` as ``client.zip`` stores it: ``quant`` and ``dequant``
    with the same arithmetic (round half to even, then clip to the offset range)."""

    def __init__(self, entry: dict):
        if entry.get("type_name") != "UniformQuantizer":
            raise ValueError(f"unsupported quantizer {entry.get('type_name')!r} in client.zip")
        v = {k: _value(x) for k, x in entry["serialized_value"].items()}
        self.n_bits, self.scale, self.zero_point = int(v["n_bits"]), v["scale"], v["zero_point"]
        self.offset, self.is_narrow, self.no_clipping = int(v["offset"]), bool(v["is_narrow"]), bool(v["no_clipping"])

    def quant(self, values: np.ndarray) -> np.ndarray:
        q = np.rint(values / self.scale + self.zero_point)
        if not self.no_clipping:
            q = q.clip(-self.offset + (1 if self.is_narrow else 0), 2 ** self.n_bits - 1 - self.offset)
        return q.astype(np.int64)

    def dequant(self, q: np.ndarray) -> np.ndarray:
        return self.scale * (q - np.asarray(self.zero_point, dtype=np.float64))


def _value(x):
    """One value of concrete-ml's serialized quantizer: a plain JSON value, or a typed numpy one."""
    if isinstance(x, dict) and "serialized_value" in x:
        kind, value, dtype = x.get("type_name"), x["serialized_value"], x.get("dtype", "float64")
        if kind == "numpy_float":
            return np.dtype(dtype).type(value)
        if kind == "numpy_array":
            return np.array(value, dtype=dtype)
        raise ValueError(f"unsupported value type {kind!r} in client.zip")
    return x


def read_client_zip(path: Path):
    """A circuit's ``client.zip`` -> (Concrete ``ProgramInfo``, input quantizer, output quantizer)."""
    import json
    import zipfile

    from concrete.compiler import ProgramInfo

    with zipfile.ZipFile(path) as z:
        specs = json.loads(z.read("client.specs.json"))
        processing = json.loads(z.read("serialized_processing.json"))
    specs.pop("tfhers_specs", None)  # concrete-python's own addition to the program info
    if processing.get("ciphertext_format", "concrete") != "concrete":
        raise ValueError(f"{path}: ciphertext format {processing['ciphertext_format']!r} is not supported")
    if processing.get("model_post_processing_params"):
        raise ValueError(f"{path}: a model with post-processing is not supported (a quantized module has none)")
    if len(processing["input_quantizers"]) != 1 or len(processing["output_quantizers"]) != 1:
        raise ValueError(f"{path}: one input and one output expected")
    info = ProgramInfo.deserialize(json.dumps(specs).encode())
    return info, _Quantizer(processing["input_quantizers"][0]), _Quantizer(processing["output_quantizers"][0])


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


def evaluation_keys_for(keyset, program_info) -> bytes:
    """Fresh evaluation keys for the secret keys in ``keyset`` (the client's keys stay the same)."""
    from concrete.compiler import Keyset

    secrets = {i: k for i, k in enumerate(keyset.get_client_keys().get_secret_keys())}
    full = Keyset(program_info, None, 0, 0, 0, 0, secrets)
    return full.get_server_keys().serialize()  # what concrete-python's EvaluationKeys.serialize() writes
