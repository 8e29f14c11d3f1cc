"""The dashboard's encrypted-inference service: the one given by ``ENGINE_SERVER_URL``, else a
local one this app starts (``python -m engine serve`` in a child process).

``app.py`` calls :func:`start` before it imports anything heavy (the pages load torch,
medmnist and the engine: about 2.7 s here), so the service starts while the first page is
still being drawn. The app does not wait for it: Home shows the start step by step
(:func:`dashboard.sessions.start_steps`); the default dataset's circuit is hosted first.
Light on purpose: nothing here imports torch or concrete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading

import streamlit as st

from engine.config import default_cache_dir, default_models_dir
from engine.learn import registry
from engine.serve.client import ServiceUnavailable, find_circuit
from engine.serve.transports import HTTPTransport
from engine.serve.process import LocalServiceProcess
from engine.serve.keymaker import KeyMakerProcess

from .keysets import SharedKeys

DEFAULT_DATASET = "pneumoniamnist"


@st.cache_resource(show_spinner=False)
def _service() -> tuple[str, str, LocalServiceProcess | None]:
    url = os.environ.get("ENGINE_SERVER_URL", "").strip()
    if url:
        return url.rstrip("/"), "ENGINE_SERVER_URL", None
    from engine.serve.keyvault import keep_only

    log = default_cache_dir() / "service.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # A key folder that outlives the app: after a restart the service still knows the app's
    # shared key sets (SharedKeys), so the first answer needs no key generation. Nothing else
    # is kept: the secret keys of the sessions' and spare key sets were in this app's memory only.
    key_dir = default_cache_dir() / "service-keys"
    if key_dir.exists():
        keep_only(key_dir, _kept_key_ids())
    proc = LocalServiceProcess(default_models_dir(), default_cache_dir(), log=log, key_dir=key_dir,
                               key_disk_bytes=2 * 2**30, first=DEFAULT_DATASET, wait=False)
    return proc.url, "started by this app (a separate local process)", proc


def _kept_key_ids() -> list[str]:
    out = []
    for f in (default_cache_dir() / "client").glob(f"*/{SharedKeys.FILE}"):
        try:
            out.append(json.loads(f.read_text())["key_id"])
        except (OSError, ValueError, KeyError):
            pass
    return out


def service_url() -> str:
    return _service()[0]


def service_origin() -> str:
    return _service()[1]


def service_status() -> dict:
    """The service's ``/health``: ``status`` ok, starting (with its ``step`` and the circuits
    ``hosted`` so far), error, or launching (not listening yet)."""
    proc = _service()[2]
    if proc is not None:
        return proc.status()
    try:
        import httpx

        return httpx.get(f"{service_url()}/health", timeout=2).json()
    except Exception:  # noqa: BLE001 - shown as not reachable
        return {"status": "launching"}


@st.cache_resource(show_spinner=False)
def transport_to(url: str) -> HTTPTransport:
    return HTTPTransport(url)


@st.cache_resource(show_spinner=False)
def _shared_keys(url: str, dataset: str, name: str, model_hash: str):
    """The app's own key set of a model's circuit (started at once, kept across restarts): it
    answers a session's first predictions while the session's own keys are made."""
    from engine.fhe.circuit import cache_key, shipped_entry

    saved = registry.load(dataset, name)
    folder = default_cache_dir() / "client"
    shipped = shipped_entry(saved)
    if shipped is None:
        return keygen_executor().submit(lambda: SharedKeys(transport_to(url), served_circuit(saved)["id"], folder))
    # The circuit id and client.zip are known: the keys are made while the service starts, by a
    # key maker launched now (unless they are kept from an earlier start).
    cid = cache_key(saved.hash, saved.config.compile)
    return keygen_executor().submit(SharedKeys, transport_to(url), cid, folder,
                                     client_zip=shipped / "deployment" / "client.zip", maker=_early_maker(url, dataset, name, model_hash))


@st.cache_resource(show_spinner=False)
def _early_maker(url: str, dataset: str, name: str, model_hash: str) -> KeyMakerProcess | None:
    """A key maker launched at the app's start for a model's shared key set (it loads its
    libraries while the pages load theirs), unless the keys are kept from an earlier start or the
    model ships no circuit. In a process of its own: importing concrete in a thread while a page
    imports torch breaks torch's import."""
    from engine.fhe.circuit import cache_key, shipped_entry

    saved = registry.load(dataset, name)
    if shipped_entry(saved) is None:
        return None
    cid = cache_key(saved.hash, saved.config.compile)
    return None if (default_cache_dir() / "client" / cid / SharedKeys.FILE).exists() else KeyMakerProcess(start=True, log=default_cache_dir() / "keymaker.log")


def shared_future(saved: registry.SavedModel):
    return _shared_keys(service_url(), saved.dataset, saved.name, saved.hash)


def shared_keys(saved: registry.SavedModel, wait: bool = False) -> SharedKeys | None:
    """The app's shared key set for ``saved``'s circuit; None while it is being made (unless ``wait``)."""
    fut = shared_future(saved)
    if not wait and not fut.done():
        return None
    return fut.result(timeout=600)


class _Background:
    """Runs each call in a daemon thread of its own and returns its Future. Not a
    ThreadPoolExecutor: Python joins an executor's threads before the exit handlers run, so a
    thread still waiting for keys would keep a stopped app from stopping its service."""

    def submit(self, fn, *args, **kw):
        from concurrent.futures import Future

        fut: Future = Future()

        def run() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args, **kw))
                except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
                    fut.set_exception(exc)

        threading.Thread(target=run, name="session-keys", daemon=True).start()
        return fut


@st.cache_resource(show_spinner=False)
def keygen_executor() -> _Background:
    return _Background()


def served_circuit(saved: registry.SavedModel, timeout_s: float = 600.0) -> dict:
    """The service's circuit for ``saved`` (waiting while the service starts and hosts it)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        status = service_status()
        if status.get("status") == "error":
            raise ServiceUnavailable(f"the service failed to start: {status.get('error')}")
        if status.get("status") == "ok" or any(c["dataset"] == saved.dataset for c in status.get("hosted", [])):
            try:
                return find_circuit(transport_to(service_url()), saved.dataset, saved.hash,
                                    dataclasses.asdict(saved.config.compile))
            except ServiceUnavailable:
                if status.get("status") == "ok" or time.monotonic() > deadline:
                    raise
        if time.monotonic() > deadline:
            raise ServiceUnavailable(f"the service did not host {saved.dataset}/{saved.name} within {timeout_s:.0f} s")
        time.sleep(0.3)


@st.cache_resource(show_spinner=False)
def start() -> None:
    """Once per process: what the app starts at once, before its pages import anything heavy: the service, and a
    key maker for the shared key set of the default dataset's newest model."""
    url = service_url()
    try:
        saved = registry.load(DEFAULT_DATASET)
    except Exception:  # noqa: BLE001 - no such model: the pages say what to do
        return
    _early_maker(url, saved.dataset, saved.name, saved.hash)
