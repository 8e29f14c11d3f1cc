"""Where the service's FHE runs happen: a :class:`Runner` (the pluggable part), in this process
(:class:`LocalRunner`) or on a Dask cluster (:class:`engine.serve.cluster.DaskRunner`)."""

from __future__ import annotations

from typing import Any, Callable, Protocol

from ..config import ServiceConfig, cpu_cores
from ..fhe.runtime import FHEServer
from ..fhe.threads import release_memory, set_run_threads
from .hosted import HostedCircuit
from .keystore import KeyStore, KeyStores
from .workpool import WorkPool


class Runner(Protocol):
    """Runs a hosted circuit with a key set. ``where`` is the key store a key set goes to (its
    ``name``: "local", or a Dask worker's address); the value a key store keeps is what
    :meth:`warm` or :meth:`reload` answers (the keys themselves, or the worker holding them)."""

    def watch(self, joined: Callable[[str, int], None], left: Callable[[str], None]) -> None:
        """Call ``joined(worker, threads)`` and ``left(worker)`` as workers come and go."""

    def add_circuit(self, c: HostedCircuit) -> None:
        """Make ``c`` runnable wherever runs happen, now and later."""

    def load(self, c: HostedCircuit, key_id: str, body: bytes) -> Any:
        """Deserialize uploaded keys (an error: the body is malformed)."""

    def warm(self, c: HostedCircuit, key_id: str, keys: Any, where: str) -> Any:
        """Prepare loaded keys with one run in ``where``; the value its store keeps."""

    def reload(self, c: HostedCircuit, key_id: str, body: bytes, where: str) -> Any:
        """Keys read back from the key folder into ``where``; the value its store keeps."""

    def prepare(self, c: HostedCircuit, key_id: str, keys: Any) -> None:
        """The first run with reloaded keys, on the warm-up ciphertext."""

    def run(self, c: HostedCircuit, key_id: str, keys: Any, ciphertext: bytes) -> bytes:
        """One encrypted run."""

    def drop(self, key_id: str, keys: Any) -> None:
        """A key set left its store: free what it held."""

    def close(self) -> None:
        """Stop."""


class LocalRunner:
    """FHE runs in this process (threads: Concrete releases the GIL while it computes); the key
    store keeps the prepared keys themselves."""

    def watch(self, joined: Callable[[str, int], None], left: Callable[[str], None]) -> None:
        """No workers come or go here."""

    def add_circuit(self, c: HostedCircuit) -> None:
        """The circuit's server is this process's already."""

    def load(self, c: HostedCircuit, key_id: str, body: bytes):
        return FHEServer.load_keys(body)

    def warm(self, c: HostedCircuit, key_id: str, keys, where: str):
        c.server.execute(c.warm.ciphertext, keys)
        return keys

    def reload(self, c: HostedCircuit, key_id: str, body: bytes, where: str):
        """Keys checked at their upload, read back from the key folder (SHA-256 checked): the
        first run prepares them."""
        from concrete.compiler import ServerKeyset

        return ServerKeyset.deserialize(body)

    def prepare(self, c: HostedCircuit, key_id: str, keys) -> None:
        """The first run with reloaded keys, on the warm-up ciphertext (a start-up's preload)."""
        c.server.execute(c.warm.ciphertext, keys)

    def run(self, c: HostedCircuit, key_id: str, keys, ciphertext: bytes) -> bytes:
        return c.server.execute(ciphertext, keys)

    def drop(self, key_id: str, keys) -> None:
        release_memory()

    def close(self) -> None:
        pass


def backend(c: ServiceConfig, on_evict: Callable, booked: Callable[[str], set[str]],
            **options) -> tuple[Runner, WorkPool, KeyStores]:
    """The runner, the work pool and the key store(s) of a service configured as ``c``: in this
    process, or (``backend="dask"``) a Dask cluster with one key store per worker. ``options``:
    the key stores' time-outs."""
    if c.backend != "dask":
        cores = cpu_cores()
        return (LocalRunner(), WorkPool(c.workers or cores, c.max_queue, threads=set_run_threads, cores=cores),
                KeyStore(c.key_store_bytes, on_evict=on_evict, **options))
    from .cluster import DaskRunner
    from .placement import Placement

    security = None
    if c.dask_tls_ca:  # ciphertexts and keys cross the network: encrypted, both sides checked
        from distributed.security import Security

        security = Security(tls_ca_file=c.dask_tls_ca, tls_client_cert=c.dask_tls_cert,
                            tls_client_key=c.dask_tls_key, require_encryption=True)
    runner = DaskRunner(c.scheduler, security=security)
    # the runs happen in the Dask workers, with their own threads; the pool's threads only wait
    # on them: two per worker thread, so a busy worker never idles another (it grows as they join)
    pool = WorkPool(1, c.max_queue)
    store = Placement(c.key_store_bytes, on_evict=on_evict, **options)
    runner.on_run = store.count_run
    runner.booked = booked
    return runner, pool, store
