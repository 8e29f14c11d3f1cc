"""The encrypted-inference service without its web layer: circuits, key store, work pool.

:class:`Service` hosts the compiled circuit of every saved model. It holds server artifacts
only (``server.zip``), the evaluation keys clients upload, and ciphertexts; it never loads a
client's secret key. ``engine.serve.api`` puts HTTP in front of it; ``engine.serve.client`` reaches it
in-process or over HTTP through the same client API.

- Keys are checked (exact size for the circuit, a byte-exact round trip), made ready for
  computation when they are registered (one run on a warm-up ciphertext: the first run with a
  new key set is the slow one), and kept in two tiers: prepared in memory in a
  :class:`KeyStore` bounded by bytes (about 320 MB each), and serialized (56 MiB) in a
  :class:`KeyVault` folder bounded by bytes. A key set pushed out of memory is reloaded from
  the folder by the request that needs it (a *cold* run, which the work pool runs after the
  ready ones that wait, within its patience); the client uploads again only once the folder
  has lost it. With ``key_dir`` the folder outlives the process: a restarted service loads the
  most recently used key sets before it reports ready, and knows every other one.
- Every FHE run, warm-up included, goes through one fair :class:`WorkPool`.
- ``backend="dask"``: the pool's runs execute on a Dask cluster (:mod:`engine.serve.cluster`).
  Every worker loads the circuits; each key set lives on one worker, placed by
  :class:`engine.serve.placement.Placement` (one byte-bounded key store per worker), and is placed
  again from the key folder when its worker leaves: memory and cores grow with the workers.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..learn import registry
from ..config import CompileConfig, ServiceConfig, default_cache_dir, default_models_dir
from ..fhe.circuit import BatchedCircuitError, CompiledModel, compile_model, is_cached
from ..fhe.footprint import rss_bytes
from ..fhe.runtime import FHEServer
from ..fhe.threads import release_memory
from .errors import BadRequest, Busy, NoStorage, NotFound, runtime_errors
from .hosted import HostedCircuit, check_body, compile_apart
from .keystore import KeyStore, StoreFull
from .keyvault import KeyVault, name_of
from .placement import KeysMissing, WorkerLost
from .runners import backend
from .workpool import QueueFull


@dataclass
class Admitted:
    """Room reserved for one key set of ``circuit`` in ``slot`` (a worker's key store, with Dask)."""

    circuit: HostedCircuit
    slot: KeyStore


class Service:
    """Hosts circuits; registers evaluation keys; runs predictions fairly. Thread-safe."""

    def __init__(self, config: ServiceConfig | None = None):
        self.config = config or ServiceConfig()
        c = self.config
        self.models_dir = Path(c.models_dir) if c.models_dir else default_models_dir()
        self.cache_dir = Path(c.cache_dir) if c.cache_dir else default_cache_dir()
        options = dict(ttl_s=c.key_ttl_s or None, grace_s=c.key_grace_s, linger_s=c.key_linger_s)
        self.replacements = 0  # key sets placed again after their worker left (Dask)
        self._displaced: set[str] = set()
        self.runner, self.pool, self.store = backend(c, self._left_memory, self._booked, **options)
        self.discards: list[str] = []  # key files found partial or corrupt (reported, never served)
        self.vault = KeyVault(c.key_dir or None, c.key_disk_bytes, on_discard=self._discarded)
        self.reloads = 0
        self.reload_seconds: list[float] = []  # the last cold runs: reading, deserializing, first run
        self.circuits: dict[str, HostedCircuit] = {}
        self._hosting = threading.Lock()
        self.ready = False
        self.step = "starting"  # what the start-up is doing (for /health while not ready)
        self.started = time.time()
        self.runner.watch(self._worker_joined, self._worker_left)

    # -- circuits
    def load(self, progress: Callable[[str], None] | None = None) -> "Service":
        """Host the circuit of every saved model (compiled from the cache), warmed up."""
        def say(message: str) -> None:
            self.step = message
            (progress or (lambda _m: None))(message)

        first = [d.strip().lower() for d in self.config.first.split(",") if d.strip()]
        models = sorted(registry.list_models(None, self.models_dir),
                        key=lambda m: first.index(m.dataset) if m.dataset in first else len(first))
        for saved in models:
            self.host(saved, say)
        self.preload(say)
        self.ready = True
        return self

    def _left_memory(self, name: str, entry) -> None:
        self.vault.touch(name)  # in use until now: the key folder's order of use (and a restart's) says so
        self.runner.drop(name, entry.value)

    # -- Dask workers that come and go
    def _worker_joined(self, worker: str, threads: int) -> None:
        if self.store.add_worker(worker):
            self.pool.grow(2 * threads)

    def _worker_left(self, worker: str) -> None:
        """Place the key sets of a worker that left again, from their serialized copies: as many
        as fit now in the background, the others when their client's next request comes."""
        lost = self.store.remove_worker(worker)
        self._displaced.update(name for name, _ in lost)
        for name, _ in reversed(lost):  # most recently used first
            self._load_if_room(name)

    def _unpin_loaded(self, fut) -> None:
        if fut.exception() is None and fut.result()[0] is not None:
            self.store.unpin(fut.result()[0])

    def _booked(self, worker: str) -> set[str]:
        store = self.store.store_of(worker)
        return set(store.names()) if store is not None else set()

    def workers(self) -> list[dict]:
        """The Dask workers and what each holds (empty for the local backend)."""
        return self.store.describe()

    def _discarded(self, name: str, why: str) -> None:
        self.discards.append(f"{name[:16]}: {why}")
        del self.discards[:-100]

    def preload(self, say: Callable[[str], None] = lambda _m: None) -> int:
        """Load the most recently used key sets of the key folder into memory, as many as fit
        without evicting anything (after a restart: their clients' first answers are warm)."""
        jobs = [j for name, _e in self.vault.recent() if (j := self._load_if_room(name)) is not None]
        if self.discards:
            say(f"discarded {len(self.discards)} partial or corrupt key file(s) in {self.vault.folder}: "
                + "; ".join(self.discards[:5]))
        if jobs:
            say(f"loading {len(jobs)} key set(s) kept from before ({len(self.vault)} in {self.vault.folder})")
        loaded = 0
        for j in jobs:
            try:
                loaded += j.result()[0] is not None
            except Exception:  # noqa: BLE001 - a key set that does not load is reloaded (or re-uploaded) on demand
                continue
        return loaded

    def _load_if_room(self, name: str):
        """Load a kept key set into memory in the background if it fits without evicting anything
        (a restart's preload, a lost worker's key sets); the future of that job, or None."""
        kept = self.vault.entry(name)
        c = self.circuits.get(kept.circuit) if kept is not None else None
        if c is None or name in self.store or not self.store.room_for(c.footprint):
            return None
        try:
            slot = self.store.reserve(c.footprint)
            fut = self.pool.submit(name, self._load_cold, c, name, None, slot, background=True, tenant=kept.tenant)
        except (StoreFull, QueueFull):
            return None
        fut.add_done_callback(self._unpin_loaded)  # loaded and prepared: free to be evicted like any other
        return fut

    def host(self, saved: registry.SavedModel, say: Callable[[str], None] = lambda _m: None,
             compiled: CompiledModel | None = None) -> HostedCircuit:
        """Host ``saved``'s circuit (and, with ``batch_size`` > 1, its batched twin)."""
        with self._hosting:
            c = self._host(saved, compiled or self._compiled(saved, saved.config.compile, say), say)
            if self.config.batch_size > 1:
                cc = dataclasses.replace(saved.config.compile, batch_size=self.config.batch_size)
                try:
                    self._host(saved, self._compiled(saved, cc, say), say, pair=c)
                except (BatchedCircuitError, RuntimeError) as exc:  # refused by its check, here or in the child
                    say(f"{saved.dataset}/{saved.name}: no circuit for {cc.batch_size} images per call ({exc}); "
                        "its 1-image circuit is hosted")
            return c

    def _compiled(self, saved: registry.SavedModel, cc: CompileConfig, say) -> CompiledModel:
        if not is_cached(saved, cc, self.cache_dir):
            say(f"compiling {saved.dataset}/{saved.name} for {cc.batch_size} image(s) per call (in a separate process)")
            compile_apart(saved, self.cache_dir, cc)
        return compile_model(saved, cc, self.cache_dir, say)

    def _host(self, saved: registry.SavedModel, compiled: CompiledModel, say, pair: HostedCircuit | None = None) -> HostedCircuit:
        cid = compiled.report.cache_key
        if cid in self.circuits:
            return self.circuits[cid]
        say(f"hosting {saved.dataset}/{saved.name} ({cid}, {compiled.batch_size} image(s) per call)")
        c = HostedCircuit.build(saved, compiled, say, pair)
        self.runner.add_circuit(c)  # with Dask, every worker, present and future, loads it
        self.circuits[cid] = c
        return c

    def refresh(self) -> None:
        """Host models saved since start-up (called when a client names an unknown circuit)."""
        if not self.ready:  # the start-up hosts every model, in its order; a request does not jump it
            return
        known = {(c.dataset, c.model_hash) for c in self.circuits.values()}
        for saved in registry.list_models(None, self.models_dir):
            if (saved.dataset, saved.hash) not in known:
                try:
                    self.host(saved)
                except Exception:  # noqa: BLE001 - a model that does not compile is not served
                    continue

    def circuit(self, cid: str) -> HostedCircuit:
        c = self.circuits.get(cid)
        if c is None:
            self.refresh()
            c = self.circuits.get(cid)
        if c is None:
            raise NotFound(f"unknown circuit '{cid[:64]}'")
        return c

    def describe(self) -> list[dict]:
        return [c.describe() for c in self.circuits.values()]

    def client_zip(self, cid: str) -> Path:
        return self.circuit(cid).compiled.deployment_dir / "client.zip"

    # -- keys and runs
    def _reserve(self, c: HostedCircuit, avoid: str | None = None) -> KeyStore:
        try:
            return self.store.reserve(c.footprint, wait_s=self.config.key_wait_s, avoid=avoid)
        except StoreFull as exc:
            raise Busy(str(exc), retry_after=1.0) from None
        except ValueError as exc:  # one key set is larger than the store: no wait makes room
            raise NoStorage(str(exc)) from None

    def admit(self, cid: str) -> Admitted:
        """Reserve room for one key set of ``cid`` before its upload is read (429 if none can be
        made): a crowd of uploads then never holds more than the store's bound in memory.
        Pass the answer to :meth:`register`, or :meth:`release` the room."""
        c = self.circuit(cid)
        return Admitted(c, self._reserve(c))

    def release(self, admitted: Admitted) -> None:
        admitted.slot.release(admitted.circuit.footprint)

    def register(self, cid: str, body: bytes, admitted: Admitted | None = None, tenant: str = "-") -> str:
        """Check, prepare and store a client's evaluation keys (in memory, on one worker with
        Dask, and in the key folder); returns a new, unguessable key id."""
        admitted = admitted or self.admit(cid)
        c, slot = admitted.circuit, admitted.slot
        key_id = secrets.token_urlsafe(24)
        name = name_of(key_id)
        try:
            check_body(body, c.key_bytes, c.max_key_body, c.warm.keys_fit, "evaluation keys")
            try:
                keys = self.runner.load(c, name, body)
            except Exception as exc:  # noqa: BLE001 - any deserialization failure is the body's fault
                raise BadRequest(f"malformed evaluation keys ({type(exc).__name__})") from None
            for attempt in (1, 2):
                try:
                    with runtime_errors("evaluation keys do not fit this circuit"):
                        value = self.pool.run(name, self.runner.warm, c, name, keys, slot.name, background=True,
                                              tenant=tenant)[0]
                    break
                except (WorkerLost, KeysMissing) as exc:  # its worker left: another one
                    slot.release(c.footprint)
                    slot = None
                    if attempt == 2:
                        raise Busy(f"{exc}; retry", retry_after=1.0) from None
                    slot = self._reserve(c, avoid=exc.worker)
            try:
                self.vault.put(name, body, c.key_owner, tenant, in_use=self.store.__contains__)
            except OSError as exc:
                raise NoStorage(f"the service cannot store the keys ({type(exc).__name__}); retry later") from None
        except BaseException:
            if slot is not None:
                slot.release(c.footprint)
            raise
        slot.put(name, value, c.footprint, owner=c.key_owner)
        del body, keys, value
        release_memory()  # the upload's buffers and the preparation's scratch go back to the system
        return key_id

    def owner_of(self, key_id: str) -> str | None:
        """The tenant whose key set this is (None: the service does not have it)."""
        e = self.vault.entry(name_of(key_id or ""))
        return e.tenant if e is not None else None

    def key_sets_of(self, tenant: str) -> int:
        return self.vault.count(tenant)

    def _load_cold(self, c: HostedCircuit, name: str, ciphertext: bytes | None, slot: KeyStore):
        """In a worker, with room reserved for ``c.footprint`` in ``slot``: put the key set in
        memory from the key folder (unless a request before this one did) and run ``ciphertext``
        with it, or the warm-up ciphertext. Returns the pinned entry (without a ciphertext) or the result."""
        entry = self.store.acquire(name)
        start = time.perf_counter()
        if entry is not None:  # loaded meanwhile
            slot.release(c.footprint)
        else:
            got = self.vault.read(name)
            if got is None:
                slot.release(c.footprint)
                raise KeyError(name)  # gone, or found corrupt and discarded: the client uploads again
            try:
                keys = self.runner.reload(c, name, got[0], slot.name)
                del got
                if ciphertext is None:
                    self.runner.prepare(c, name, keys)
            except BaseException:
                slot.release(c.footprint)
                raise
            slot.put(name, keys, c.footprint, owner=c.key_owner)
            entry = slot.acquire(name)
            del keys
            release_memory()
            if name in self._displaced:  # its worker left: placed again, no client noticed
                self._displaced.discard(name)
                self.replacements += 1
        if ciphertext is None:
            self._count_reload(start)
            return entry
        try:
            return self.runner.run(c, name, entry.value, ciphertext)
        finally:
            self.store.unpin(entry)
            self._count_reload(start)

    def _count_reload(self, start: float) -> None:
        self.reloads += 1
        self.reload_seconds.append(time.perf_counter() - start)
        del self.reload_seconds[:-200]

    def predict(self, cid: str, key_id: str, body: bytes, tenant: str = "-") -> tuple[bytes, float, float]:
        """One encrypted run: (serialized result, seconds queued, seconds computing). With Dask, a
        run whose worker leaves is run once more, its key set placed on another worker."""
        c = self.circuit(cid)
        check_body(body, c.ciphertext_bytes, c.max_ciphertext_body, c.warm.ciphertext_fits, "ciphertext")
        try:
            FHEServer.check_ciphertext(body)
        except Exception as exc:  # noqa: BLE001
            raise BadRequest(f"malformed ciphertext ({type(exc).__name__})") from None
        name = name_of(key_id or "")
        kept = self.vault.entry(name)
        if kept is None or kept.circuit != c.key_owner:
            raise NotFound("unknown or evicted key id: upload the evaluation keys again")
        for attempt in (1, 2):
            try:
                return self._predict(c, name, body, tenant)
            except (WorkerLost, KeysMissing) as exc:
                self.store.remove(name)  # (a worker that left took it already)
                self._displaced.add(name)
                if attempt == 2:
                    raise Busy(f"{exc} twice in a row; retry", retry_after=1.0) from None
        raise AssertionError("unreachable")

    def _predict(self, c: HostedCircuit, name: str, body: bytes, tenant: str) -> tuple[bytes, float, float]:
        entry = self.store.acquire(name)
        if entry is not None and entry.owner != c.key_owner:  # cannot happen: the folder says whose they are
            self.store.unpin(entry)
            raise NotFound("unknown or evicted key id: upload the evaluation keys again")
        try:
            with runtime_errors("the ciphertext does not fit this circuit"):
                if entry is not None:
                    return self.pool.run(name, self.runner.run, c, name, entry.value, body, tenant=tenant)
                slot = self._reserve(c)  # out of memory: reload from the key folder, in the room reserved here
                try:
                    fut = self.pool.submit(name, self._load_cold, c, name, body, slot, tenant=tenant, cold=True)
                except QueueFull:
                    slot.release(c.footprint)
                    raise
                return fut.result()
        except KeyError:  # the key folder lost them (already discarded): the client uploads again
            self.store.remove(name)
            raise NotFound("unknown or evicted key id: upload the evaluation keys again") from None
        finally:
            if entry is not None:
                self.store.unpin(entry)

    def forget(self, cid: str, key_id: str) -> bool:
        """Drop a client's keys (a session that ends), from memory and the key folder; True if
        they were here."""
        self.circuit(cid)
        name = name_of(key_id or "")
        in_memory = self.store.remove(name)
        return self.vault.remove(name) or in_memory

    def stats(self) -> dict:
        return {"queue_depth": self.pool.depth, "running": self.pool.running, "key_store_bytes": self.store.used_bytes,
                "key_store_capacity_bytes": self.store.capacity, "key_store_entries": len(self.store),
                "key_store_evictions": self.store.evictions, "key_dir_bytes": self.vault.used_bytes,
                "key_dir_capacity_bytes": self.vault.capacity, "key_dir_entries": len(self.vault),
                "key_dir_evictions": self.vault.evictions, "key_dir_discarded": self.vault.discarded,
                "key_reloads": self.reloads, "key_replacements": self.replacements, "rss_bytes": rss_bytes(),
                "workers": self.pool.workers,
                "backend": self.config.backend}

    def close(self) -> None:
        self.pool.close()
        for name in self.store.names():  # the key sets in memory were the last used
            self.vault.touch(name)
        self.runner.close()
        self.vault.close()
