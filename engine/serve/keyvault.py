"""Every registered key set in its compact serialized form, on disk, bounded by bytes.

The service keeps two tiers of evaluation keys. This is the lower one: the bytes a client
uploaded (56 MiB for the shipped PneumoniaMNIST circuit), one file per key set, so that a key
set pushed out of memory (:class:`engine.serve.keystore.KeyStore`, about 320 MB prepared) is
reloaded by the server from here and the client never uploads it again. The folder is
``--key-dir`` (kept across restarts: every tenant's keys survive one) or a private temporary
folder removed at exit.

- A key set's files are named by the SHA-256 of its key id, so a listing of the folder gives
  nobody a key id to use. Beside the keys, a small JSON file holds the circuit, the tenant that
  uploaded them, their size and their SHA-256.
- Writes are atomic (a temporary file, flushed and synced, then renamed); the JSON file is
  written last, so a key set without one was never complete.
- A file that is partial, corrupt or unmatched is discarded and reported (``on_discard``),
  never served: sizes are checked when the folder is opened, the SHA-256 on every read.
- Past ``capacity_bytes`` the least recently used key sets are deleted (``last_used`` is the
  files' modification time, so the order survives restarts); those in memory are spared.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable


@dataclass
class VaultEntry:
    circuit: str  # the circuit whose keys these are (a batched twin's pair: the 1-image circuit)
    tenant: str
    nbytes: int
    sha256: str
    created: float
    last_used: float = 0.0


def name_of(key_id: str) -> str:
    """The name a key set is kept under (files, memory, queues): the SHA-256 of its key id."""
    return hashlib.sha256(key_id.encode()).hexdigest()


class KeyVault:
    def __init__(self, folder: str | Path | None, capacity_bytes: int,
                 on_discard: Callable[[str, str], None] | None = None):
        """``folder`` None: a temporary folder, removed by :meth:`close`."""
        if capacity_bytes <= 0:
            raise ValueError("the key folder needs a positive capacity in bytes")
        self.capacity = int(capacity_bytes)
        self._temporary = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="engine-keys-")) if folder is None else Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.on_discard = on_discard or (lambda _name, _why: None)
        self._entries: dict[str, VaultEntry] = {}  # file name (hash of the key id) -> entry
        self._lock = threading.Lock()
        self.discarded = 0
        self.evictions = 0
        self._open()

    # -- figures
    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._entries

    def entry(self, name: str) -> VaultEntry | None:
        with self._lock:
            return self._entries.get(name)

    def count(self, tenant: str) -> int:
        with self._lock:
            return sum(1 for e in self._entries.values() if e.tenant == tenant)

    def recent(self) -> list[tuple[str, VaultEntry]]:
        """(file name, entry), most recently used first (what to load at start-up)."""
        with self._lock:
            return sorted(self._entries.items(), key=lambda kv: -kv[1].last_used)

    # -- files
    def _paths(self, name: str) -> tuple[Path, Path]:
        return self.folder / f"{name}.keys", self.folder / f"{name}.json"

    def _open(self) -> None:
        """Index the folder: complete key sets are kept, anything else is discarded and reported."""
        for tmp in self.folder.glob(".*.tmp"):
            self._discard_file(tmp, "an unfinished write")
        for meta_path in sorted(self.folder.glob("*.json")):
            name = meta_path.stem
            keys_path = self.folder / f"{name}.keys"
            try:
                data = json.loads(meta_path.read_text())
                entry = VaultEntry(**{k: data[k] for k in ("circuit", "tenant", "nbytes", "sha256", "created")})
                if not keys_path.exists() or keys_path.stat().st_size != entry.nbytes:
                    raise ValueError("its keys are missing or of the wrong size")
                entry.last_used = keys_path.stat().st_mtime
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self._discard(name, f"unreadable ({exc})")
                continue
            self._entries[name] = entry
        for keys_path in self.folder.glob("*.keys"):
            if keys_path.stem not in self._entries:
                self._discard(keys_path.stem, "keys without their description (a write that did not finish)")

    def _discard_file(self, path: Path, why: str) -> None:
        path.unlink(missing_ok=True)
        self.discarded += 1
        self.on_discard(path.name, why)

    def _discard(self, name: str, why: str) -> None:
        for p in self._paths(name):
            p.unlink(missing_ok=True)
        self.discarded += 1
        self.on_discard(name, why)

    def _write(self, path: Path, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- use
    def put(self, name: str, body: bytes, circuit: str, tenant: str,
            in_use: Callable[[str], bool] = lambda _k: False) -> list[str]:
        """Store a key set; returns the file names of key sets deleted to make room (never one
        for which ``in_use(file name)`` holds). Raises ``OSError`` if the disk refuses."""
        if len(body) > self.capacity:
            raise ValueError(f"one key set is {len(body):,} bytes but the key folder holds {self.capacity:,}")
        entry = VaultEntry(circuit, tenant, len(body), hashlib.sha256(body).hexdigest(), time.time(), time.time())
        with self._lock:
            gone = self._make_room(len(body), in_use)
        keys_path, meta_path = self._paths(name)
        self._write(keys_path, body)
        self._write(meta_path, json.dumps(asdict(entry)).encode())
        with self._lock:
            self._entries[name] = entry
        return gone

    def _make_room(self, nbytes: int, in_use: Callable[[str], bool]) -> list[str]:
        used = sum(e.nbytes for e in self._entries.values())
        gone = []
        for name, _e in sorted(self._entries.items(), key=lambda kv: kv[1].last_used):
            if used + nbytes <= self.capacity:
                break
            if in_use(name):
                continue
            used -= self._entries.pop(name).nbytes
            for p in self._paths(name):
                p.unlink(missing_ok=True)
            gone.append(name)
        self.evictions += len(gone)
        return gone

    def read(self, name: str) -> tuple[bytes, VaultEntry] | None:
        """The key set's bytes, checked against their SHA-256 (None: unknown, or discarded now)."""
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            return None
        keys_path, _ = self._paths(name)
        try:
            body = keys_path.read_bytes()
        except OSError as exc:
            body, why = b"", f"unreadable ({exc})"
        else:
            why = "" if hashlib.sha256(body).hexdigest() == entry.sha256 else "its bytes no longer match their SHA-256"
        if why:
            with self._lock:
                self._entries.pop(name, None)
            self._discard(name, why)
            return None
        self.touch(name)
        return body, entry

    def touch(self, name: str) -> None:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return
            entry.last_used = time.time()
        try:
            os.utime(self._paths(name)[0], (entry.last_used, entry.last_used))
        except OSError:
            pass

    def remove(self, name: str) -> bool:
        with self._lock:
            entry = self._entries.pop(name, None)
        for p in self._paths(name):
            p.unlink(missing_ok=True)
        return entry is not None

    def close(self) -> None:
        if self._temporary:
            shutil.rmtree(self.folder, ignore_errors=True)



def keep_only(folder: str | Path, key_ids) -> int:
    """Delete every key set in ``folder`` (of a service not running on it) but those of
    ``key_ids``; returns how many went. The dashboard's local service keeps only the app's
    shared key sets across restarts: the secret keys of its sessions' and spare key sets lived
    in the app's memory only, so their evaluation keys would be of no use to anyone."""
    folder = Path(folder)
    keep = {name_of(k) for k in key_ids}
    gone = set()
    for path in folder.glob("*"):
        name = path.name.split(".", 1)[0].lstrip(".")
        if path.is_file() and name not in keep:
            path.unlink(missing_ok=True)
            gone.add(name)
    return len(gone)
