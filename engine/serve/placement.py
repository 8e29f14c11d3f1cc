"""Key sets placed on workers: one byte-bounded LRU key store per worker, behind one interface.

With the Dask backend every key set lives on exactly one worker, as a model lives on one
replica under Ray Serve's multiplexing: its runs go only there. :class:`Placement` keeps one
:class:`engine.serve.keystore.KeyStore` per worker, each bounded by the same byte budget
(``--key-store-bytes`` bounds each worker), with the local store's rules (LRU, entries in use
never evicted, grace and linger). It offers the calls the service makes of a single key store:

- :meth:`reserve` chooses the worker, the one with the most free budget, ties broken by the
  runs using its keys now, and answers that worker's store: the caller puts the key set there;
- :meth:`acquire`, :meth:`unpin`, :meth:`remove` find the worker that holds a key set (an
  entry's value is its worker's address);
- :meth:`add_worker` and :meth:`remove_worker` follow the cluster. A worker that leaves takes
  its key sets with it; the service places them again from their serialized copies.

The bookkeeping stays in the service: it decides where keys go and evicts from a worker's
store (telling that worker to drop them), so a worker only holds what it is told to.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from typing import Callable

from .keystore import Entry, KeyStore, StoreFull


class WorkerLost(Exception):
    """The worker that holds a key set (or was running with it) left the cluster."""

    def __init__(self, worker: str):
        super().__init__(f"worker {worker} left")
        self.worker = worker


class ClusterError(Exception):
    """The cluster did not carry out a step (a transfer or a call timed out) though the worker
    is still there: the service answers 429, and the client retries."""


class KeysMissing(Exception):
    """A worker was asked to run with keys it does not hold (it restarted at the same address)."""

    def __init__(self, worker: str, name: str):
        super().__init__(f"worker {worker} does not hold key set {name[:16]}")
        self.worker = worker
        self.name = name


class Placement:
    def __init__(self, capacity_per_worker: int, on_evict: Callable[[str, Entry], None] | None = None,
                 **store_options):
        if capacity_per_worker <= 0:
            raise ValueError("the key store needs a positive capacity in bytes")
        self.per_worker = int(capacity_per_worker)
        self.on_evict = on_evict
        self._options = store_options
        self._stores: dict[str, KeyStore] = {}
        self._lock = threading.Lock()
        self._gone_evictions = 0
        self.runs: Counter = Counter()  # worker -> runs finished there
        self.left: deque[str] = deque(maxlen=100)  # the last workers that left, in order

    # -- the cluster
    def add_worker(self, worker: str) -> bool:
        with self._lock:
            if worker in self._stores:
                return False
            self._stores[worker] = KeyStore(self.per_worker, on_evict=self.on_evict, name=worker, **self._options)
            return True

    def remove_worker(self, worker: str) -> list[tuple[str, Entry]]:
        """Forget a worker that left; answers the key sets it held (least recently used first)."""
        with self._lock:
            store = self._stores.pop(worker, None)
        if store is None:
            return []
        self.left.append(worker)
        self._gone_evictions += store.evictions
        return store.drain()

    def workers(self) -> list[str]:
        with self._lock:
            return list(self._stores)

    def store_of(self, worker: str) -> KeyStore | None:
        with self._lock:
            return self._stores.get(worker)

    def _all(self) -> list[KeyStore]:
        with self._lock:
            return list(self._stores.values())

    def describe(self) -> list[dict]:
        return [{"worker": s.name, "key_sets": len(s), "key_bytes": s.used_bytes, "capacity_bytes": s.capacity,
                 "runs_in_flight": s.in_use, "runs": self.runs[s.name]} for s in self._all()]

    # -- figures (the service's, summed over workers)
    @property
    def capacity(self) -> int:
        return self.per_worker * len(self._all())

    @property
    def used_bytes(self) -> int:
        return sum(s.used_bytes for s in self._all())

    @property
    def evictions(self) -> int:
        return self._gone_evictions + sum(s.evictions for s in self._all())

    def __len__(self) -> int:
        return sum(len(s) for s in self._all())

    def __contains__(self, name: str) -> bool:
        return any(name in s for s in self._all())

    def names(self) -> list[str]:
        return [n for s in self._all() for n in s.names()]

    def where(self, name: str) -> str | None:
        return next((s.name for s in self._all() if name in s), None)

    def room_for(self, nbytes: int) -> bool:
        return any(s.room_for(nbytes) for s in self._all())

    # -- admission and use
    def reserve(self, nbytes: int, wait_s: float = 0.0, avoid: str | None = None) -> KeyStore:
        """Room for one key set on one worker: the one with the most free budget (ties: the fewest
        runs in flight), else the first whose idle entries can make room. Waits up to ``wait_s``."""
        if nbytes > self.per_worker:
            raise ValueError(f"one key set needs {nbytes:,} bytes but a worker's key store holds {self.per_worker:,}")
        deadline = time.monotonic() + wait_s
        while True:
            stores = sorted(self._all(), key=lambda s: (s.name == avoid, -s.free_bytes, s.in_use))
            for s in stores:
                try:
                    return s.reserve(nbytes)
                except StoreFull:
                    continue
            if time.monotonic() >= deadline:
                raise StoreFull(f"every worker's key store is full ({len(self)} key sets in use on "
                                f"{len(stores)} worker(s))" if stores else "no worker in the cluster")
            time.sleep(0.1)

    def acquire(self, name: str) -> Entry | None:
        for s in self._all():
            if name in s:
                e = s.acquire(name)
                if e is not None:
                    return e
        return None

    def unpin(self, entry: Entry) -> None:
        s = self.store_of(entry.value)
        if s is not None:  # a worker that left took the entry with it
            s.unpin(entry)

    def remove(self, name: str) -> bool:
        return any([s.remove(name) for s in self._all()])

    def count_run(self, worker: str) -> None:
        self.runs[worker] += 1
