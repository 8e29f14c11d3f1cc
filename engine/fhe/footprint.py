"""The memory one registered, prepared key set takes in a server process (what a key store is
bounded by), measured once per circuit and stored with its warm-up material."""

from __future__ import annotations

import json
import secrets

import psutil

from .circuit import CompiledModel
from .runtime import FHEServer, warmup_material
from .threads import release_memory


def rss_bytes() -> int:
    """This process's resident memory."""
    return psutil.Process().memory_info().rss


def key_set_footprint(compiled: CompiledModel, server: FHEServer) -> int:
    """Memory one registered, prepared key set takes: the resident-memory growth of deserializing
    the throwaway keys and running once with them. Measured the first time and stored with the
    warm-up material (``footprint.json``; a shipped circuit carries it), so every service on the
    machine accounts a circuit's keys alike, and a start with it runs nothing: the first run of
    the circuit's code in this process is then the first client's (its keys' preparation)."""
    stored = compiled.path / "warmup" / "footprint.json"
    try:
        return int(json.loads(stored.read_text())["key_set_bytes"])
    except (OSError, ValueError, KeyError):
        pass
    warm = warmup_material(compiled, samples=True)
    release_memory()
    before = rss_bytes()
    keys = FHEServer.load_keys(warm.evaluation_keys)
    server.execute(warm.ciphertext, keys)
    measured = max(rss_bytes() - before, warm.key_bytes)
    del keys
    release_memory()
    tmp = stored.with_suffix(f".{secrets.token_hex(4)}")
    tmp.write_text(json.dumps({"key_set_bytes": measured}))
    tmp.replace(stored)
    return measured
