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
            self._eval_keys = evaluation_keys_for(self._keys._keyset, self._client.client.specs.program_info)
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


def evaluation_keys_for(keyset, program_info) -> bytes:
    """Fresh evaluation keys for the secret keys in ``keyset`` (the client's keys stay the same)."""
    from concrete import fhe
    from concrete.compiler import Keyset

    secrets = {i: k for i, k in enumerate(keyset.get_client_keys().get_secret_keys())}
    full = Keyset(program_info, None, 0, 0, 0, 0, secrets)
    return fhe.EvaluationKeys(full.get_server_keys()).serialize()
