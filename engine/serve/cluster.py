"""The service's FHE runs on a Dask cluster: circuits on every worker, each key set on one.

- **Circuits** reach every worker through a Dask ``WorkerPlugin`` per circuit (its compiled
  library, a few KB): the scheduler keeps the plugins and sets them up on each worker that
  joins later, before it runs anything.
- **Key sets** are placed by the service (:class:`engine.serve.placement.Placement`): a key set
  is registered on one worker and its runs are restricted to that worker (``workers=[addr]``,
  ``allow_other_workers=False``).
- **Membership**: a watcher polls the scheduler and tells the service which workers joined and
  left. A run whose worker left raises :class:`WorkerLost`; the service places the key set again
  from its serialized copy and retries the run once.

The serialized key sets stay with the service (its key folder, ``--key-dir``, or memory): a
worker needs no shared file system, and a placement sends 56 MiB to one worker.

Workers import this module: start them with the project on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import Callable

from distributed import Client, WorkerPlugin, get_worker

from ..fhe.runtime import FHEServer
from ..fhe.threads import release_memory, set_run_threads
from .placement import ClusterError, KeysMissing, WorkerLost

# Per Dask worker process: loaded circuits and registered key sets.
_W_SERVERS: dict[str, FHEServer] = {}
_W_KEYS: dict[str, object] = {}


def _one_run_per_thread() -> None:
    """Each run on one core (``ENGINE_RUN_THREADS`` to change it): a worker runs ``--nthreads``
    runs side by side, and workers are started one thread per core, so spreading a run over more
    threads would only oversubscribe the cores (several workers on one machine, as in the bench)."""
    set_run_threads(int(os.environ.get("ENGINE_RUN_THREADS", "1")))


class CircuitPlugin(WorkerPlugin):
    """Loads one hosted circuit on every worker, present or future."""

    def __init__(self, digest: str, library_zip: bytes):
        self.digest = digest
        self.library_zip = library_zip

    def setup(self, worker) -> None:
        _worker_load_circuit(self.digest, self.library_zip)


def _worker_load_circuit(digest: str, library_zip: bytes) -> None:
    if digest not in _W_SERVERS:
        folder = Path(tempfile.mkdtemp(prefix="fhe-worker-"))
        (folder / "library.zip").write_bytes(library_zip)
        _W_SERVERS[digest] = FHEServer(folder, library=folder / "library.zip")


def _worker_register(digest: str, key_id: str, body: bytes, warm_ciphertext: bytes) -> str:
    """Deserialize a key set and prepare it (one run on the warm-up ciphertext); answers where."""
    keys = FHEServer.load_keys(body)
    del body
    _one_run_per_thread()
    _W_SERVERS[digest].execute(warm_ciphertext, keys)
    _W_KEYS[key_id] = keys
    release_memory()
    return get_worker().address


def _worker_run(digest: str, key_id: str, ciphertext: bytes) -> bytes:
    keys = _W_KEYS.get(key_id)
    if keys is None:
        raise LookupError(f"no key set {key_id}")
    _one_run_per_thread()
    return _W_SERVERS[digest].execute(ciphertext, keys)


def _worker_drop(key_id: str) -> None:
    if _W_KEYS.pop(key_id, None) is not None:
        release_memory()


def worker_state() -> dict:
    """What this worker holds (``client.run(worker_state)``): circuits, key sets, memory."""
    import psutil

    return {"circuits": sorted(_W_SERVERS), "key_sets": sorted(_W_KEYS), "rss_bytes": psutil.Process().memory_info().rss}


class DaskRunner:
    """The service's runner for ``--backend dask`` (see the module's docstring)."""

    def __init__(self, scheduler: str, poll_s: float = 0.5, security=None):
        self.client = Client(scheduler, security=security)
        self.poll_s = poll_s
        self.workers: dict[str, int] = {}  # address -> threads
        self._joined: Callable[[str, int], None] = lambda _a, _n: None
        self._left: Callable[[str], None] = lambda _a: None
        self._sync_lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.on_run: Callable[[str], None] = lambda _a: None
        # the service's books: the key sets it placed on a worker (set by the service)
        self.booked: Callable[[str], set[str]] | None = None
        self._pending: dict[str, set[str]] = {}  # worker -> key sets being registered there now
        self._pending_lock = threading.Lock()
        self._suspects: dict[str, set[str]] = {}
        self.sweep_every = 10  # polls between two sweeps (5 s)
        self.orphans_dropped = 0
        self._sync()

    # -- membership
    def watch(self, joined: Callable[[str, int], None], left: Callable[[str], None]) -> None:
        """Call ``joined(address, threads)`` for each worker now and later, ``left(address)`` for each that goes."""
        self._joined, self._left = joined, left
        for a, n in list(self.workers.items()):
            joined(a, n)
        self._watcher = threading.Thread(target=self._watch, name="dask-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        polls = 0
        while not self._stop.wait(self.poll_s):
            try:
                self._sync()
                polls += 1
                if self.booked is not None and polls % self.sweep_every == 0:
                    self.sweep()
            except Exception:  # noqa: BLE001 - the scheduler may be briefly unreachable: poll again
                continue

    def sweep(self) -> int:
        """Drop the key sets a worker holds that the service's books do not place there, and that
        no registration is putting there now: a registration the service gave up on (a call that
        failed while the task still ran) would otherwise hold a worker's memory for good. A key set
        is dropped only when two sweeps in a row find it so. Returns how many this sweep dropped."""
        states = self.client.run(worker_state, on_error="ignore")
        dropped = 0
        for w, st in states.items():
            with self._pending_lock:
                pending = set(self._pending.get(w, ()))
            extra = set(st["key_sets"]) - self.booked(w) - pending
            again = extra & self._suspects.get(w, set())
            for name in again:
                self.drop(name, w)
            dropped += len(again)
            self._suspects[w] = extra - again
        self.orphans_dropped += dropped
        return dropped

    def _sync(self) -> None:
        with self._sync_lock:
            # asked of the scheduler directly: client.scheduler_info() answers a cached copy that the
            # client's periodic refresh overwrites without the workers (they all seemed to leave)
            identity = self.client.sync(self.client.scheduler.identity, n_workers=-1)
            now = {a: int(w.get("nthreads", 1)) for a, w in identity["workers"].items()}
            joined = [(a, n) for a, n in now.items() if a not in self.workers]
            left = [a for a in self.workers if a not in now]
            for a, n in joined:
                self.workers[a] = n
            for a in left:
                del self.workers[a]
        for a in left:
            self._left(a)
        for a, n in joined:
            self._joined(a, n)

    def alive(self, worker: str) -> bool:
        """Whether ``worker`` is still in the cluster (asked of the scheduler; if the scheduler does
        not answer now, the last known membership)."""
        try:
            self._sync()
        except Exception:  # noqa: BLE001 - the watcher keeps polling
            pass
        return worker in self.workers

    # -- circuits
    def add_circuit(self, c) -> None:
        self.client.register_plugin(CircuitPlugin(c.server_zip_digest, c.warm.library.read_bytes()),
                                    name=f"fhe-circuit-{c.server_zip_digest[:16]}")

    # -- key sets and runs (the runner interface of engine.serve.hosting)
    def _wait(self, fut, worker: str, name: str):
        """The task's result; :class:`WorkerLost` if its worker leaves first.

        Waits on the future's done callback, checking the worker every ``poll_s``: a loop of
        ``fut.result(timeout=...)`` calls raised ``UnboundLocalError`` from inside Dask under load
        (``distributed.utils.sync`` leaves its result unset when the awaited future is cancelled,
        which ``asyncio.wait_for`` can do on Python 3.11 when a timeout and the answer cross)."""
        done = threading.Event()
        fut.add_done_callback(lambda _f: done.set())
        while not done.wait(self.poll_s):
            if not self.alive(worker):
                fut.cancel()
                raise WorkerLost(worker)
        if fut.status == "finished":
            return fut.result()
        if fut.status == "error":
            exc = fut.exception()
            if isinstance(exc, LookupError):
                raise KeysMissing(worker, name)
            if type(exc).__name__ == "KilledWorker" or not self.alive(worker):
                raise WorkerLost(worker)
            raise exc  # the worker's own error (Concrete refusing the input: a bad request)
        if not self.alive(worker):  # cancelled or lost with its worker
            raise WorkerLost(worker)
        raise ClusterError(f"a call to {worker} ended {fut.status}")

    def _submit(self, worker: str, fn, *args):
        return self.client.submit(fn, *args, workers=[worker], allow_other_workers=False, pure=False)

    def load(self, c, key_id: str, body: bytes):
        FHEServer.load_keys(body)  # validated here, so no worker ever sees malformed keys
        return body

    def warm(self, c, key_id: str, body: bytes, worker: str) -> str:
        """Register the key set on ``worker`` (with its first run); the store keeps the address."""
        if worker not in self.workers:
            raise WorkerLost(worker)
        with self._pending_lock:
            self._pending.setdefault(worker, set()).add(key_id)
        try:
            return self._register(c, key_id, body, worker)
        finally:
            with self._pending_lock:
                self._pending.get(worker, set()).discard(key_id)

    def _register(self, c, key_id: str, body: bytes, worker: str) -> str:
        try:
            data = self.client.scatter(body, workers=[worker], hash=False)
        except Exception as exc:  # noqa: BLE001 - a transfer that failed: the worker left, or try again later
            if not self.alive(worker):
                raise WorkerLost(worker) from None
            raise ClusterError(f"sending a key set to {worker} failed ({type(exc).__name__})") from exc
        try:
            fut = self._submit(worker, _worker_register, c.server_zip_digest, key_id, data, c.warm.ciphertext)
            return self._wait(fut, worker, key_id)
        finally:
            data.release()

    def reload(self, c, key_id: str, body: bytes, worker: str) -> str:
        return self.warm(c, key_id, body, worker)

    def prepare(self, c, key_id: str, worker: str) -> None:
        pass  # registering prepared them

    def run(self, c, key_id: str, worker: str, ciphertext: bytes) -> bytes:
        fut = self._submit(worker, _worker_run, c.server_zip_digest, key_id, ciphertext)
        out = self._wait(fut, worker, key_id)
        self.on_run(worker)
        return out

    def drop(self, key_id: str, worker: str) -> None:
        if worker in self.workers:
            try:
                self.client.run(_worker_drop, key_id, workers=[worker])
            except Exception:  # noqa: BLE001 - a worker that left has nothing to drop
                pass

    def states(self) -> dict:
        return self.client.run(worker_state, on_error="return")

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        self.client.close()
