"""One client API, two transports: the encrypted-inference service in-process or over HTTP.

:class:`EncryptedClient` is the data owner's side of one circuit: its keys (an
:class:`engine.fhe.keys.FHEClient`), encryption, the call to the service, decryption. It uploads the
evaluation keys once, then keeps only the secret keys; when a service answers that it does not
know the key (404: evicted, restarted, another replica), it derives fresh evaluation keys from
the same secret keys, uploads them and retries, without the caller noticing.

Transports: :class:`InProcessTransport` (a :class:`engine.serve.hosting.Service` in this process) and
:class:`HTTPTransport` (one or several replicas' URLs, taken in turn, skipping one that does
not answer). Pages, the CLI and the load test use the same calls with either.
"""

from __future__ import annotations

import itertools
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, TypeVar

import numpy as np

from ..config import CompileConfig
from ..fhe.keys import FHEClient

T = TypeVar("T")


class ServiceUnavailable(Exception):
    """The service cannot be reached or keeps refusing; the message says what to do."""


class KeyGone(Exception):
    """The service does not know this key id (never registered, evicted or restarted)."""


class Retry(Exception):
    """The service is busy (429): try again after ``after`` seconds."""

    def __init__(self, message: str, after: float):
        super().__init__(message)
        self.after = after


class Rejected(ServiceUnavailable):
    """The service refused this request (HTTP ``status``: 400 malformed, 404 unknown circuit, 413
    too large, 507 no storage): sending it again does not help."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def refusal(status: int, message: str, what: str, retry_after: float = 1.0, key_id: str | None = None) -> Exception:
    """The client's exception for a service error, the same whichever transport met it: 429 is
    :class:`Retry`, a 404 to a prediction (``key_id``) :class:`KeyGone`, 401 a missing token, any
    other error :class:`Rejected`."""
    if status == 429:
        return Retry(message, retry_after)
    if status == 404 and key_id is not None:
        return KeyGone(key_id)
    if status == 401:
        return ServiceUnavailable(f"{what}: the service wants a token (--token or ENGINE_TOKEN): {message}")
    return Rejected(f"{what}: HTTP {status}: {message}", status)


class Transport(Protocol):
    """How a client reaches the service: in this process or over HTTP. Every method raises the
    client's exceptions (:func:`refusal`), never the service's own."""

    def endpoints(self) -> list[str]: ...

    def next_endpoint(self) -> str: ...

    def describe(self) -> str: ...

    def circuits(self, endpoint: str | None = None) -> list[dict]: ...

    def client_zip(self, cid: str, endpoint: str | None = None) -> bytes: ...

    def upload_keys(self, endpoint: str, cid: str, keys: bytes) -> str: ...

    def predict(self, endpoint: str, cid: str, key_id: str, ciphertext: bytes) -> "Reply": ...

    def forget(self, endpoint: str, cid: str, key_id: str) -> None: ...

    def close(self) -> None: ...


@dataclass
class Reply:
    body: bytes
    queue_s: float = 0.0
    server_s: float = 0.0


class InProcessTransport:
    """The service core in this process: no network, same calls, same exceptions."""

    def __init__(self, service):
        self.service = service

    def endpoints(self) -> list[str]:
        return ["in-process"]

    def next_endpoint(self) -> str:
        return "in-process"

    def describe(self) -> str:
        return "in this process"

    @contextmanager
    def _mapped(self, what: str, key_id: str | None = None):
        from .errors import Busy, ServiceError

        try:
            yield
        except ServiceError as exc:
            after = exc.retry_after if isinstance(exc, Busy) else 1.0
            raise refusal(exc.status, str(exc), what, after, key_id) from None

    def circuits(self, endpoint: str | None = None) -> list[dict]:
        return self.service.describe()

    def client_zip(self, cid: str, endpoint: str | None = None) -> bytes:
        with self._mapped("download client.zip"):
            return self.service.client_zip(cid).read_bytes()

    def upload_keys(self, endpoint: str, cid: str, keys: bytes) -> str:
        with self._mapped("upload evaluation keys"):
            return self.service.register(cid, keys)

    def predict(self, endpoint: str, cid: str, key_id: str, ciphertext: bytes) -> Reply:
        with self._mapped("encrypted prediction", key_id):
            body, queued, ran = self.service.predict(cid, key_id, ciphertext)
        return Reply(body, queued, ran)

    def forget(self, endpoint: str, cid: str, key_id: str) -> None:
        with self._mapped("forget keys"):
            self.service.forget(cid, key_id)

    def close(self) -> None:
        pass


class HTTPTransport:
    """The service over HTTP (httpx, one connection pool per transport). Several base URLs are
    replicas: requests take them in turn, and one that does not answer is skipped."""

    def __init__(self, urls: str | list[str], timeout: float = 300.0, token: str | None = None,
                 ca_file: str | None = None):
        """``token``: the tenant's bearer token (default ``$ENGINE_TOKEN``); ``ca_file``: the CA
        that signed an ``https://`` service's certificate (default ``$ENGINE_CA_FILE``, else the
        system's)."""
        import os
        import ssl

        import httpx

        token = token or os.environ.get("ENGINE_TOKEN") or None
        ca_file = ca_file or os.environ.get("ENGINE_CA_FILE") or None
        items = urls.split(",") if isinstance(urls, str) else list(urls)
        self.urls = [u.strip().rstrip("/") for u in items if u.strip()]
        if not self.urls:
            raise ValueError("no service URL given")
        for u in self.urls:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"service URL must start with http:// or https://, got '{u}'")
        if ca_file and not os.path.exists(ca_file):
            raise ValueError(f"CA file {ca_file} does not exist")
        verify = ssl.create_default_context(cafile=ca_file) if ca_file else True
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self._http = httpx.Client(timeout=httpx.Timeout(timeout, connect=5.0), verify=verify, headers=headers)
        self._turn = itertools.cycle(range(len(self.urls)))

    def endpoints(self) -> list[str]:
        return list(self.urls)

    def describe(self) -> str:
        return ", ".join(self.urls)

    def next_endpoint(self) -> str:
        return self.urls[next(self._turn)]

    def _request(self, method: str, url: str, **kw):
        import httpx

        try:
            return self._http.request(method, url, **kw)
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(f"cannot reach {url}: {type(exc).__name__}: {exc}") from None

    @staticmethod
    def _check(r, what: str, key_id: str | None = None):
        if r.status_code >= 400:
            raise refusal(r.status_code, _message(r), what, float(r.headers.get("retry-after", "1")), key_id)
        return r

    def circuits(self, endpoint: str | None = None) -> list[dict]:
        return self._check(self._request("GET", f"{endpoint or self.urls[0]}/circuits"), "list circuits").json()

    def client_zip(self, cid: str, endpoint: str | None = None) -> bytes:
        return self._check(self._request("GET", f"{endpoint or self.urls[0]}/circuits/{cid}/client.zip"),
                           "download client.zip").content

    def upload_keys(self, endpoint: str, cid: str, keys: bytes) -> str:
        r = self._request("POST", f"{endpoint}/circuits/{cid}/keys", content=keys,
                          headers={"content-type": "application/octet-stream"})
        return self._check(r, "upload evaluation keys").json()["key_id"]

    def predict(self, endpoint: str, cid: str, key_id: str, ciphertext: bytes) -> Reply:
        r = self._request("POST", f"{endpoint}/circuits/{cid}/predict", content=ciphertext,
                          headers={"content-type": "application/octet-stream", "x-key-id": key_id})
        self._check(r, "encrypted prediction", key_id)
        return Reply(r.content, float(r.headers.get("x-queue-seconds", 0)), float(r.headers.get("x-server-seconds", 0)))

    def forget(self, endpoint: str, cid: str, key_id: str) -> None:
        self._request("DELETE", f"{endpoint}/circuits/{cid}/keys/{key_id}")

    def metrics(self, endpoint: str | None = None) -> dict[str, float]:
        """The service's Prometheus samples without labels (gauges and totals)."""
        text = self._check(self._request("GET", f"{endpoint or self.urls[0]}/metrics"), "metrics").text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, _, value = line.partition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
        return out

    def close(self) -> None:
        self._http.close()


def _message(r) -> str:
    try:
        return str(r.json().get("error", r.text))[:300]
    except Exception:  # noqa: BLE001
        return r.text[:300]


def find_circuit(transport, dataset: str, model_hash: str, compile_settings: dict | None = None) -> dict:
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

    def __init__(self, transport, circuit_id: str, fhe_client: FHEClient, keep_evaluation_keys: bool = False,
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
    def download(cls, transport, circuit_id: str, folder: Path, **kw) -> "EncryptedClient":
        """A client whose ``client.zip`` comes from the service (all a client needs for its keys)."""
        folder = Path(folder) / circuit_id
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "client.zip").exists():
            tmp = folder / f".client.zip.{time.time_ns()}"
            tmp.write_bytes(transport.client_zip(circuit_id))
            tmp.rename(folder / "client.zip")
        return cls(transport, circuit_id, FHEClient(folder), **kw)

    @classmethod
    def from_keys(cls, transport, circuit_id: str, folder: Path, secret_keyset: bytes, key_ids: dict[str, str],
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
