"""One client API over either transport (``engine.serve.transports``): the encrypted-inference
service in-process or over HTTP.

:class:`EncryptedClient` is the data owner's side of one circuit: its keys (an
:class:`engine.fhe.keys.FHEClient`), encryption, the call to the service, decryption. It uploads the
evaluation keys once, then keeps only the secret keys; when a service answers that it does not
know the key (404: evicted, restarted, another replica), it derives fresh evaluation keys from
the same secret keys, uploads them and retries, without the caller noticing.

Pages, the CLI and the load test use the same calls with either transport.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np

from ..config import CompileConfig
from ..fhe.keys import FHEClient
from .transports import KeyGone, Rejected, Retry, ServiceUnavailable, Transport

T = TypeVar("T")


def find_circuit(transport: Transport, dataset: str, model_hash: str, compile_settings: dict | None = None) -> dict:
    """The service's circuit for a saved model (by content hash), with its own compile settings
    unless ``compile_settings`` says which."""
    listed = transport.circuits()
    wanted = None if compile_settings is None else CompileConfig.settings(compile_settings)
    for c in listed:
        if c["dataset"] == dataset and c["model_hash"] == model_hash and c.get("batch_size", 1) == 1 and \
                (wanted is None or CompileConfig.settings(c["compile"]) == wanted):
            return c
    served = ", ".join(f"{c['dataset']}/{c['model']}" for c in listed) or "none"
    raise ServiceUnavailable(f"the service at {transport.describe()} does not serve this model with these compile "
                             f"settings (it serves: {served}); use the model's own settings or restart the service")


@dataclass
class Exchange:
    """What crossed the wire for one prediction."""

    ciphertext: bytes
    result: bytes
    endpoint: str
    key_uploads: int = 0
    stages: dict = field(default_factory=dict)


class EncryptedClient:
    """A client of one circuit through a transport: keys, upload once, encrypt, predict, decrypt."""

    def __init__(self, transport: Transport, circuit_id: str, fhe_client: FHEClient, keep_evaluation_keys: bool = False,
                 max_wait_s: float = 600.0):
        self.transport = transport
        self.circuit_id = circuit_id
        self.fhe = fhe_client
        self.keep_evaluation_keys = keep_evaluation_keys
        self.max_wait_s = max_wait_s
        self.key_ids: dict[str, str] = {}  # endpoint -> key id there
        self.key_circuit = circuit_id  # where the keys are uploaded (a twin's: the 1-image circuit)
        self.uploads = 0
        self.uploaded_bytes = 0
        self.upload_s = 0.0
        self.evaluation_key_bytes = 0

    @classmethod
    def download(cls, transport: Transport, circuit_id: str, folder: Path, **kw) -> "EncryptedClient":
        """A client whose ``client.zip`` comes from the service (all a client needs for its keys)."""
        folder = Path(folder) / circuit_id
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "client.zip").exists():
            tmp = folder / f".client.zip.{time.time_ns()}"
            tmp.write_bytes(transport.client_zip(circuit_id))
            tmp.rename(folder / "client.zip")
        return cls(transport, circuit_id, FHEClient(folder), **kw)

    @classmethod
    def from_keys(cls, transport: Transport, circuit_id: str, folder: Path, secret_keyset: bytes, key_ids: dict[str, str],
                  evaluation_key_bytes: int, keygen_s: float = 0.0,
                  upload_s: float | None = None) -> "EncryptedClient":
        """A client with keys made elsewhere (a key maker process, or kept from an earlier start):
        :meth:`download` then :meth:`adopt`."""
        return cls.download(transport, circuit_id, folder).adopt(secret_keyset, key_ids, evaluation_key_bytes,
                                                                 keygen_s, upload_s)

    def adopt(self, secret_keyset: bytes, key_ids: dict[str, str], evaluation_key_bytes: int, keygen_s: float = 0.0,
              upload_s: float | None = None) -> "EncryptedClient":
        """Use keys made elsewhere: their secret keys, and the ids their evaluation keys were
        registered under per endpoint; ``upload_s``: that upload counts as this client's own."""
        self.fhe.adopt_secret_keys(secret_keyset, keygen_s)
        self.key_ids = dict(key_ids)
        self.evaluation_key_bytes = evaluation_key_bytes
        if upload_s is not None:
            self.uploads, self.upload_s, self.uploaded_bytes = 1, upload_s, evaluation_key_bytes
        return self

    def twin(self, circuit_id: str, folder: Path) -> "EncryptedClient":
        """A client of ``circuit_id``, the service's circuit for several images per call of the
        same model, with this client's keys: the same key ids, no second upload."""
        other = EncryptedClient.download(self.transport, circuit_id, folder, keep_evaluation_keys=self.keep_evaluation_keys,
                                         max_wait_s=self.max_wait_s)
        other.fhe.share_keys(self.fhe)
        other.key_ids, other.key_circuit = self.key_ids, self.key_circuit
        return other

    def _endpoint(self) -> str:
        eps = self.transport.endpoints()
        return self.transport.next_endpoint() if len(eps) > 1 else eps[0]

    def register(self, endpoint: str | None = None) -> str:
        """Upload the evaluation keys to ``endpoint`` (once); returns the key id there."""
        endpoint = endpoint or self._endpoint()
        if endpoint in self.key_ids:
            return self.key_ids[endpoint]
        self.fhe.keygen()
        keys = self.fhe.evaluation_keys()
        t0 = time.perf_counter()
        key_id, _ = self._retrying(lambda ep: self.transport.upload_keys(ep, self.key_circuit, keys), endpoint)
        self.upload_s += time.perf_counter() - t0
        self.uploads += 1
        self.uploaded_bytes += len(keys)
        self.evaluation_key_bytes = len(keys)
        self.key_ids[endpoint] = key_id
        if not self.keep_evaluation_keys:
            self.fhe.forget_evaluation_keys()
        return key_id

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, Exchange]:
        """Features of one image (1, F), or of up to the circuit's batch size (n, F), sent as one
        request -> (logits (n, C), the exchange with its stage timings)."""
        t0 = time.perf_counter()
        ct = self.fhe.encrypt(x)
        encrypt_s = time.perf_counter() - t0
        return self._send(ct, len(x), encrypt_s)

    def rerun(self, exchange: Exchange, n: int = 1) -> np.ndarray:
        """Send an earlier exchange's ciphertext again and decrypt the answer: a check that the
        service answered it alike (the load test does this alone, after its crowd)."""
        return self._send(exchange.ciphertext, n, 0.0)[0]

    def _retrying(self, call: Callable[[str], T], endpoint: str | None = None) -> tuple[T, str]:
        """(``call(endpoint)``'s answer, the endpoint), the one retry loop: a busy service is
        waited for (up to ``max_wait_s``), a key set it lost uploaded again, an endpoint that does
        not answer skipped for the next (twice round the replicas at most; never with a fixed
        ``endpoint``); a request it rejects is raised at once."""
        deadline = time.monotonic() + self.max_wait_s
        failures, replicas = 0, len(self.transport.endpoints())
        while True:
            ep = endpoint or self._endpoint()
            try:
                return call(ep), ep
            except KeyGone:
                self.key_ids.pop(ep, None)  # re-upload on the next turn
            except Retry as r:
                if time.monotonic() + r.after > deadline:
                    raise ServiceUnavailable(f"the service stayed busy for {self.max_wait_s:.0f} s: {r}") from None
                time.sleep(r.after)
            except Rejected:
                raise
            except ServiceUnavailable:
                failures += 1
                if endpoint is not None or failures >= 2 * replicas:
                    raise
            if time.monotonic() > deadline:
                raise ServiceUnavailable(f"no answer within {self.max_wait_s:.0f} s")

    def _send(self, ct: bytes, n: int, encrypt_s: float) -> tuple[np.ndarray, Exchange]:
        uploads0 = self.uploads

        def attempt(endpoint: str):
            key_id = self.register(endpoint)
            t1 = time.perf_counter()
            reply = self.transport.predict(endpoint, self.circuit_id, key_id, ct)
            return reply, time.perf_counter() - t1

        (reply, wall), endpoint = self._retrying(attempt)
        t2 = time.perf_counter()
        logits = self.fhe.decrypt(reply.body, n)
        decrypt_s = time.perf_counter() - t2
        stages = {"encrypt_s": encrypt_s, "queue_s": reply.queue_s, "server_s": reply.server_s,
                  "network_s": max(0.0, wall - reply.queue_s - reply.server_s), "decrypt_s": decrypt_s}
        return logits, Exchange(ct, reply.body, endpoint, self.uploads - uploads0, stages)

    def close(self, forget: bool = True) -> None:
        """Tell each service to drop this client's keys (best effort)."""
        if forget:
            for endpoint, key_id in list(self.key_ids.items()):
                try:
                    self.transport.forget(endpoint, self.circuit_id, key_id)
                except Exception:  # noqa: BLE001 - the service may be gone already
                    pass
        self.key_ids.clear()
