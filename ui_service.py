"""The dashboard's encrypted-inference service: the one given by ``ENGINE_SERVER_URL``, else a
local one this app starts (``python -m engine serve`` in a child process).

``app.py`` calls :func:`service_url` before it imports anything heavy (``ui`` loads torch,
medmnist and the engine: about 2.7 s here), so the service starts while the first page is
still being drawn. The app does not wait for it: Home shows the start step by step
(``ui.start_steps``); the default dataset's circuit is hosted first.
"""

from __future__ import annotations

import json
import os

import streamlit as st

from engine.config import default_cache_dir, default_models_dir
from engine.serve.client import LocalServiceProcess
from engine.serve.keymaker import SharedKeys

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


