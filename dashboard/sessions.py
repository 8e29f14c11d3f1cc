"""Each browser session's own keys: taken from a pool made ahead of demand, dropped on the service
when the session ends; and the start-up as a session sees it."""

from __future__ import annotations

import os
import weakref

import streamlit as st

from engine.config import default_cache_dir
from engine.fhe.threads import release_memory
from engine.learn import registry
from engine.serve.client import EncryptedClient

from .keysets import KeyPool
from .service import keygen_executor, served_circuit, service_status, service_url, shared_future, transport_to


@st.cache_resource(show_spinner=False)
def _key_pool(url: str, circuit_id: str) -> KeyPool:
    import atexit

    spares = int(os.environ.get("ENGINE_KEY_SPARES", "8"))
    pool = KeyPool(lambda: transport_to(url), circuit_id, default_cache_dir() / "client", spares=spares,
                   log=default_cache_dir() / "keymaker.log")
    atexit.register(pool.close)  # before the local service stops (registered earlier, runs later)
    return pool


def start_steps(saved: registry.SavedModel) -> list[tuple[bool, str]]:
    """The start-up as this session sees it: (done, what) for the service, this model's circuit,
    the app's shared key set and this session's own keys."""
    status = service_status()
    state = status.get("status")
    hosted = [c for c in status.get("hosted", []) if c["dataset"] == saved.dataset]
    if state == "ok":
        service = (True, f"Service ready ({status.get('circuits')} circuits)")
    elif state == "launching":
        service = (False, "Service process starting")
    elif state == "error":
        service = (False, f"Service failed: {status.get('error')}")
    else:
        service = (False, f"Service starting: {status.get('step', '')} ({status.get('circuits', 0)} circuits hosted)")
    circuit = (state == "ok" or bool(hosted), f"Circuit of {saved.dataset}/{saved.name} hosted")
    shared = shared_future(saved)
    if shared.done():
        exc = shared.exception()
        app = (exc is None, "App's shared key set " + (f"ready ({shared.result().origin})" if exc is None else f"failed: {exc}"))
    else:
        app = (False, "App's shared key set being made (key generation, then the upload once the circuit is hosted)")
    own = st.session_state.get("session_keys", {}).get(saved.hash)
    mine = (own is not None and own.future.done() and own.future.exception() is None,
            "This session's own keys " + ("ready" if own is not None and own.future.done() else "being made"))
    return [service, circuit, app, mine]


class SessionKeys:
    """This browser session's client of one circuit; drops its keys on the service when the
    session ends (Streamlit clears the session state, this object is collected)."""

    def __init__(self, future):
        self.future = future
        weakref.finalize(self, SessionKeys._release, future)

    @staticmethod
    def _release(future) -> None:
        if future.done() and future.exception() is None:
            future.result().close()
        release_memory()


def prepare_keys(saved: registry.SavedModel) -> None:
    """Start getting this session's keys (from the pool, else generated) without waiting."""
    keys: dict = st.session_state.setdefault("session_keys", {})
    if saved.hash in keys:
        return
    url = service_url()
    shared = shared_future(saved)  # started first: the first answers need not wait for this session's keys

    def get() -> EncryptedClient:
        from concurrent.futures import wait as wait_for

        wait_for([shared], timeout=600)  # the shared key set first: the two would share the cores
        return _key_pool(url, served_circuit(saved)["id"]).take()

    keys[saved.hash] = SessionKeys(keygen_executor().submit(get))


def session_remote(saved: registry.SavedModel, wait: bool = True, patience_s: float = 0.5) -> EncryptedClient | None:
    """This session's client (keys uploaded, secret keys only); None if not ready and not ``wait``
    (after ``patience_s``: a spare key set is handed out in milliseconds, so a fresh session's
    first page already has its keys)."""
    prepare_keys(saved)
    fut = st.session_state["session_keys"][saved.hash].future
    if not wait:
        from concurrent.futures import wait as wait_for

        if not wait_for([fut], timeout=patience_s).done:
            return None
    return fut.result(timeout=600)
