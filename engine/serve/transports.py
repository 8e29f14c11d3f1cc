"""The client's side of the wire: the exceptions every client sees, the :class:`Transport` protocol,
and its two implementations.

:class:`InProcessTransport` (a :class:`engine.serve.hosting.Service` in this process) and
:class:`HTTPTransport` (one or several replicas' URLs, taken in turn, skipping one that does
not answer) raise the same exception for each of the service's errors (:func:`refusal`).
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol


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
