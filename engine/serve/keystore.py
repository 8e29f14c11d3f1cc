"""A key store bounded by bytes: least recently used entries go first, entries in use never.

The service keeps each client's evaluation keys here, deserialized and prepared for computation
(about 310 MB each for the shipped PneumoniaMNIST circuit, against 56 MB serialized). Sizes are
what the caller says an entry costs in memory. An entry is *pinned* while a request uses it and
is never evicted then; a freshly registered entry is also spared for ``grace_s`` seconds or
until its first use, so a burst of new clients cannot evict a key between its upload and its
first prediction. A registration that finds no room waits (up to a bound) for an entry to
become idle: uploads queue instead of being refused and sent again; past the bound
:class:`StoreFull` tells the caller to retry later.
An optional idle time-to-live drops entries nobody used for ``ttl_s`` seconds. An entry used
within the last ``linger_s`` seconds is evicted only once it has been idle that long: a client
between two requests (decrypting one answer, encrypting the next) keeps its keys.

Under the service this is the upper tier: every key set also stays serialized in a
:class:`engine.serve.keyvault.KeyVault`, so an entry that leaves is reloaded, not uploaded again.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol


class StoreFull(Exception):
    """No room can be made right now: every entry is in use (retry shortly)."""


@dataclass
class Entry:
    value: Any
    nbytes: int
    owner: str  # the circuit the keys belong to
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    pins: int = 0
    used: bool = False


class KeyStores(Protocol):
    """Where the service keeps prepared key sets: one :class:`KeyStore` (local runs), or one per
    Dask worker (:class:`engine.serve.placement.Placement`)."""

    capacity: int  # bytes
    used_bytes: int
    evictions: int

    def __len__(self) -> int: ...

    def __contains__(self, name: str) -> bool: ...

    def names(self) -> list[str]: ...

    def describe(self) -> list[dict]: ...

    def room_for(self, nbytes: int) -> bool: ...

    def reserve(self, nbytes: int, wait_s: float = 0.0, avoid: str | None = None) -> "KeyStore": ...

    def acquire(self, name: str) -> Entry | None: ...

    def unpin(self, entry: Entry) -> None: ...

    def remove(self, name: str) -> bool: ...


class KeyStore:
    def __init__(self, capacity_bytes: int, ttl_s: float | None = None, grace_s: float = 30.0,
                 on_evict: Callable[[str, Entry], None] | None = None, clock: Callable[[], float] = time.monotonic,
                 linger_s: float = 0.0, name: str = "local"):
        if capacity_bytes <= 0:
            raise ValueError("the key store needs a positive capacity in bytes")
        self.capacity = int(capacity_bytes)
        self.name = name  # where the entries live: this process, or a Dask worker's address
        self.ttl_s = ttl_s
        self.grace_s = grace_s
        self.linger_s = linger_s
        self.on_evict = on_evict
        self._clock = clock
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._reserved = 0
        self._lock = threading.Condition()  # also signals "room may have been freed"
        self.evictions = 0

    # -- figures
    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    @property
    def free_bytes(self) -> int:
        """Room left without evicting anything (reservations count as used)."""
        with self._lock:
            return self.capacity - sum(e.nbytes for e in self._entries.values()) - self._reserved

    @property
    def in_use(self) -> int:
        """Requests using an entry now (the load of this store's worker)."""
        with self._lock:
            return sum(e.pins for e in self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key_id: str) -> bool:
        with self._lock:
            return key_id in self._entries

    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def room_for(self, nbytes: int) -> bool:
        """Whether ``nbytes`` fit now without evicting anything."""
        with self._lock:
            return sum(e.nbytes for e in self._entries.values()) + self._reserved + nbytes <= self.capacity

    def describe(self) -> list[dict]:
        """The workers and what each holds (:meth:`engine.serve.placement.Placement.describe`):
        none here, the one store is this process's."""
        return []

    # -- admission
    def reserve(self, nbytes: int, wait_s: float = 0.0, avoid: str | None = None) -> "KeyStore":
        """Make room for ``nbytes`` and hold it for a ``put``: evict idle entries, least recently
        used first, but only if that makes enough room (never for nothing). Waits up to
        ``wait_s`` for entries in use to become idle, then raises :class:`StoreFull`. ``avoid``
        (a worker to keep clear of) means nothing to the one store of a process. Returns the
        store that holds the room (this one; :class:`engine.serve.placement.Placement` answers
        the chosen worker's)."""
        if nbytes > self.capacity:
            raise ValueError(f"one key set needs {nbytes:,} bytes but the key store holds {self.capacity:,}")
        evicted: list[tuple[str, Entry]] = []
        deadline = self._clock() + wait_s
        with self._lock:
            while True:
                evicted += self._expire_locked()
                victims = self._victims_locked(nbytes)
                if victims is not None:
                    for key_id in victims:
                        evicted.append((key_id, self._entries.pop(key_id)))
                    self._reserved += nbytes
                    break
                left = deadline - self._clock()
                if left <= 0:
                    self._notify(evicted)
                    raise StoreFull(f"key store full ({len(self._entries)} key sets in use)")
                self._lock.wait(min(left, 0.5))
        self._notify(evicted)
        return self

    def _victims_locked(self, nbytes: int) -> list[str] | None:
        """Least recently used idle entries whose removal makes room for ``nbytes`` (None: impossible now)."""
        now = self._clock()
        used = sum(e.nbytes for e in self._entries.values()) + self._reserved
        victims = []
        for key_id, e in self._entries.items():
            if used + nbytes <= self.capacity:
                break
            if e.pins or (not e.used and now - e.created < self.grace_s) or now - e.last_used < self.linger_s:
                continue
            victims.append(key_id)
            used -= e.nbytes
        return victims if used + nbytes <= self.capacity else None

    def release(self, nbytes: int) -> None:
        """Give back a reservation that will not become an entry."""
        with self._lock:
            self._reserved = max(0, self._reserved - nbytes)
            self._lock.notify_all()

    def put(self, key_id: str, value: Any, nbytes: int, owner: str) -> None:
        """Store an entry whose room was reserved with :meth:`reserve`."""
        with self._lock:
            self._reserved = max(0, self._reserved - nbytes)
            self._entries[key_id] = Entry(value, nbytes, owner, created=self._clock(), last_used=self._clock())
            self._lock.notify_all()

    # -- use
    def acquire(self, key_id: str) -> Entry | None:
        """The entry, pinned (call :meth:`unpin` when done), or None if unknown or evicted."""
        expired = []
        with self._lock:
            expired = self._expire_locked()
            e = self._entries.get(key_id)
            if e is not None:
                e.pins += 1
                e.used = True
                e.last_used = self._clock()
                self._entries.move_to_end(key_id)
        self._notify(expired)
        return e

    def unpin(self, entry: Entry) -> None:
        with self._lock:
            entry.pins = max(0, entry.pins - 1)
            entry.last_used = self._clock()
            self._lock.notify_all()

    def remove(self, key_id: str) -> bool:
        with self._lock:
            e = self._entries.pop(key_id, None)
            self._lock.notify_all()
        if e is not None:
            self._notify([(key_id, e)], count=False)
        return e is not None

    def drain(self) -> list[tuple[str, Entry]]:
        """Take every entry out without notifying (their memory is already gone: a worker that left)."""
        with self._lock:
            gone = list(self._entries.items())
            self._entries.clear()
            self._reserved = 0
            self._lock.notify_all()
        return gone

    def _expire_locked(self) -> list[tuple[str, Entry]]:
        if not self.ttl_s:
            return []
        now = self._clock()
        gone = [(k, e) for k, e in self._entries.items() if not e.pins and now - e.last_used > self.ttl_s]
        for k, _ in gone:
            del self._entries[k]
        return gone

    def _notify(self, evicted: list[tuple[str, Entry]], count: bool = True) -> None:
        if count:
            self.evictions += len(evicted)
        if self.on_evict:
            for key_id, e in evicted:
                self.on_evict(key_id, e)
