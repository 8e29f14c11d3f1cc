"""Run encrypted inference for a batch across processes or a Dask cluster (joblib).

The client encrypts the images one call at a time (one image per call, or ``batch_size``
images for a circuit compiled to take several: see ``CompileConfig.batch_size``) and hands each
call to a worker as soon as it is encrypted, so encryption overlaps the workers' runs. A worker
(a loky process here, a ``dask.distributed`` worker elsewhere) receives only ``server.zip``, the
serialized evaluation keys and ciphertexts; it loads the server once and keeps the deserialized
evaluation keys for every later call. The client decrypts.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed, parallel_config

from ..fhe.keys import FHEClient
from ..fhe.runtime import FHEServer

_SERVERS: dict[str, FHEServer] = {}  # per worker process: server.zip digest -> loaded server


def _server_for(server_zip: bytes) -> FHEServer:
    digest = hashlib.sha256(server_zip).hexdigest()
    if digest not in _SERVERS:
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="fhe-server-"))
        (folder / "server.zip").write_bytes(server_zip)
        _SERVERS[digest] = FHEServer(folder)
    return _SERVERS[digest]


def serve_call(server_zip: bytes, evaluation_keys: np.ndarray, ciphertext: bytes, key_id: str) -> tuple[bytes, float]:
    """Worker side: run the circuit on one call's ciphertext; returns (result, seconds).

    The keys (a uint8 array: loky workers get one shared memory map) are deserialized once per
    worker; later calls find them by ``key_id`` (:meth:`FHEServer.key_id`)."""
    server = _server_for(server_zip)
    if not server.holds(key_id):
        server.register(bytes(evaluation_keys))
    t0 = time.perf_counter()
    result = server.run(ciphertext, key_id)
    return result, time.perf_counter() - t0


@dataclass
class BatchResult:
    logits: np.ndarray
    encrypt_s: np.ndarray  # per image, on the client
    server_s: np.ndarray  # per image (a call's time shared by its images), measured in the worker
    decrypt_s: np.ndarray  # per image, on the client
    sizes: dict
    server_wall_s: float  # from the first call sent to the last result back (encryption overlaps it)
    n_workers: int
    wall_s: float = 0.0  # first encryption to last decryption


@contextmanager
def backend_context(backend: str = "local", scheduler: str | None = None, n_jobs: int = 2):
    """joblib configuration for ``local`` (loky processes) or ``dask`` (a distributed cluster)."""
    if backend == "local":
        with parallel_config(backend="loky", n_jobs=n_jobs):
            yield n_jobs
    elif backend == "dask":
        from dask.distributed import Client

        if not scheduler:
            raise ValueError("--backend dask needs --scheduler tcp://HOST:PORT")
        client = Client(scheduler)
        try:
            workers = max(1, sum(client.nthreads().values()))
            with parallel_config(backend="dask", n_jobs=workers):
                yield workers
        finally:
            client.close()
    else:
        raise ValueError(f"Unknown backend '{backend}': use local or dask")


def run_batch(client: FHEClient, server_zip: Path, features: np.ndarray, backend: str = "local",
              scheduler: str | None = None, n_jobs: int = 2, warm: bool = False) -> BatchResult:
    """Encrypt ``features`` (N, F) in calls of ``client.batch_size`` images, run the calls on the
    workers, decrypt. The client encrypts the next call while the workers run the previous ones
    (calls are handed out as they are encrypted). ``warm``: every worker first loads the circuit
    and prepares the keys, outside the clock."""
    eval_keys = client.evaluation_keys()
    key_id = FHEServer.key_id(eval_keys)
    keys = np.frombuffer(eval_keys, np.uint8)
    zip_bytes = Path(server_zip).read_bytes()
    b, enc_s, cts = client.batch_size, [], []

    def calls():
        for i in range(0, len(features), b):
            t0 = time.perf_counter()
            cts.append(client.encrypt(features[i : i + b]))
            n = min(b, len(features) - i)
            enc_s.extend([(time.perf_counter() - t0) / n] * n)
            yield delayed(serve_call)(zip_bytes, keys, cts[-1], key_id)

    with backend_context(backend, scheduler, n_jobs) as workers:
        if warm and len(features):
            ct = client.encrypt(features[:b])
            Parallel()(delayed(serve_call)(zip_bytes, keys, ct, key_id) for _ in range(workers))
        t0 = time.perf_counter()
        parts = Parallel(batch_size=1)(calls())
        server_wall = time.perf_counter() - t0
        logits, dec_s, server_s = [], [], []
        for k, (res, call_s) in enumerate(parts):
            n = min(b, len(features) - k * b)
            t1 = time.perf_counter()
            logits.append(client.decrypt(res, n))
            dec_s += [(time.perf_counter() - t1) / n] * n
            server_s += [call_s / n] * n
        wall = time.perf_counter() - t0
    sizes = {"ciphertext_bytes": len(cts[0]) if cts else 0, "result_bytes": len(parts[0][0]) if parts else 0,
             "eval_key_bytes": len(eval_keys), "images_per_call": b}
    return BatchResult(np.concatenate(logits) if logits else np.zeros((0, 0)), np.array(enc_s), np.array(server_s),
                       np.array(dec_s), sizes, server_wall, workers, wall)
