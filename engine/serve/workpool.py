"""A bounded pool of FHE runs, fair between tenants, then between each tenant's clients.

Each client (a key set) has its own first-in first-out queue, and each tenant (a token) a
rotation of its clients: the workers serve the tenants in turn and, within a tenant, its
clients in turn, one job each. One client sending a burst cannot starve the others, and a
tenant with many key sets (the dashboard: one token, many sessions) gets the share of one
tenant, not of all its sessions.

A job marked ``cold`` must first load its keys (from their serialized form: deserializing and
preparing them costs several runs). While a job whose keys are ready waits, a cold one is
passed over for up to ``cold_patience_s``: the ready one finishes in a fraction of the time,
and its keys are then free to leave memory for the cold one. The total number
of waiting jobs is bounded: past it :meth:`WorkPool.submit` raises :class:`QueueFull` and the
service answers 429.

The workers (one per core) share the cores without oversubscribing them: with ``threads``,
a job that starts with nothing else running or waiting may spread over every core, and a job
that starts while others run or wait uses one core. One Concrete run spread over 2 cores takes
0.30 s and 0.59 s of CPU; on one core 0.44 s of both: a lone visitor gets the faster answer, a
crowd gets about a third more answers per second (8 clients: 4.2 against 3.3 requests/s).

A client's jobs never run at the same time: a worker skips a client whose job is running. One
client's second job gains nothing from a second worker that another client could use, and two
concurrent Concrete runs with the same deserialized evaluation keys crashed the process once
(a segmentation fault in ``concrete_cpu_mul_cleartext_lwe_ciphertext_u64`` within 10 pairs of
32-image runs). That run shared one Concrete circuit object between threads, which is not
reentrant whatever the keys (:class:`engine.fhe.runtime.FHEServer` now gives each run its own).

Jobs submitted with ``background=True`` (the service's key warm-ups) run only when no
foreground job (a prediction) waits: a visitor's prediction never queues behind the warm-up of
keys made ahead of demand for someone else.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from typing import Any, Callable


class QueueFull(Exception):
    """Too many jobs are waiting: retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: float):
        super().__init__(f"the work queue is full; retry in {retry_after:.0f} s")
        self.retry_after = retry_after


class WorkPool:
    def __init__(self, workers: int = 1, max_queue: int = 64, name: str = "fhe",
                 threads: Callable[[int], Any] | None = None, cores: int | None = None,
                 cold_patience_s: float = 2.0):
        """``threads(n)``, called in a worker before each job: let the job use ``n`` threads,
        every one of the ``cores`` if it runs alone, else its share of them (at least 1)."""
        if workers < 1 or max_queue < 1:
            raise ValueError("workers and max_queue must be at least 1")
        self.workers = workers
        self._name = name
        self._threads_for = threads
        self.cores = cores or workers
        self.max_queue = max_queue
        # lane -> tenant -> client -> jobs; dict order is the rotation order
        self._queues: OrderedDict[str, OrderedDict[str, deque]] = OrderedDict()
        self._background: OrderedDict[str, OrderedDict[str, deque]] = OrderedDict()
        self.cold_patience_s = cold_patience_s
        self._waiting = 0
        self._busy: set[str] = set()  # owners with a job running (at most one each)
        self._cond = threading.Condition()
        self._closed = False
        self._mean_run_s = 0.3  # running estimate, for Retry-After
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    @property
    def depth(self) -> int:
        """Jobs waiting (not yet running)."""
        return self._waiting

    @property
    def running(self) -> int:
        return len(self._busy)

    def submit(self, owner: str, fn: Callable[..., Any], *args, background: bool = False,
               tenant: str = "-", cold: bool = False) -> Future:
        fut: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the work pool is closed")
            if self._waiting >= self.max_queue:
                raise QueueFull(max(1.0, self._waiting * self._mean_run_s / self.workers))
            lane = self._background if background else self._queues
            lane.setdefault(tenant, OrderedDict()).setdefault(owner, deque()).append(
                (fut, fn, args, time.perf_counter(), cold))
            self._waiting += 1
            self._cond.notify()
        return fut

    def _ready_lane(self):
        """(lane, tenant, owner) of the next job to run, or None: tenants in turn, then their
        clients in turn, skipping clients with a job running; ready keys before cold ones
        (within the patience), predictions before background work."""
        now = time.perf_counter()
        for lane in (self._queues, self._background):
            for patient in (True, False):
                for tenant, owners in lane.items():
                    for owner, q in owners.items():
                        if owner in self._busy:
                            continue
                        if patient and q[0][4] and now - q[0][3] < self.cold_patience_s:
                            continue
                        return lane, tenant, owner
        return None

    def _next(self, lane, tenant, owner):
        owners = lane.pop(tenant)
        q = owners.pop(owner)
        job = q.popleft()
        if q:  # back of the rotation: the tenant's other clients go first
            owners[owner] = q
        if owners:  # and the other tenants before this one
            lane[tenant] = owners
        self._waiting -= 1
        return job[:4]

    def _work(self) -> None:
        while True:
            with self._cond:
                while (ready := self._ready_lane()) is None and not (self._closed and not self._waiting):
                    self._cond.wait()
                if ready is None:  # closed and drained
                    return
                lane, tenant, owner = ready
                fut, fn, args, queued_at = self._next(lane, tenant, owner)
                alone = not self._busy and not self._waiting
                self._busy.add(owner)
            if self._threads_for is not None:
                self._threads_for(self.cores if alone else max(1, self.cores // self.workers))
            if fut.set_running_or_notify_cancel():
                start = time.perf_counter()
                try:
                    fut.set_result((fn(*args), start - queued_at, time.perf_counter() - start))
                except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                    fut.set_exception(exc)
                self._mean_run_s = 0.8 * self._mean_run_s + 0.2 * (time.perf_counter() - start)
            with self._cond:
                self._busy.discard(owner)
                self._cond.notify_all()  # this owner's next job, or closing, may now proceed

    def run(self, owner: str, fn: Callable[..., Any], *args, background: bool = False, tenant: str = "-",
            cold: bool = False) -> tuple[Any, float, float]:
        """Submit and wait: (result, seconds queued, seconds running)."""
        return self.submit(owner, fn, *args, background=background, tenant=tenant, cold=cold).result()

    def grow(self, n: int) -> None:
        """``n`` more workers (the Dask backend's pool grows as workers join the cluster)."""
        with self._cond:
            if self._closed:
                return
            start = len(self._threads)
            added = [threading.Thread(target=self._work, name=f"{self._name}-{start + i}", daemon=True) for i in range(n)]
            self._threads += added
            self.workers += n
        for t in added:
            t.start()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=30)
