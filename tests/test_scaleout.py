"""The Dask backend places each key set on one worker, follows workers that join and leave, and
no client notices a worker killed -9: a LocalCluster of at most 2 worker processes, the real
tiny circuit, the HTTP service on a loopback port."""

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from conftest import REPO
from engine.serve.client import EncryptedClient
from engine.serve.transports import HTTPTransport
from engine.serve.hosting import Service
from engine.serve.keyvault import name_of
from test_service import RunningService, config


def wait_for(what, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what}")


def holdings(service: Service) -> dict[str, list[str]]:
    """Each live worker's key sets, as the workers themselves report them."""
    return {a: sorted(s["key_sets"]) for a, s in service.runner.states().items() if isinstance(s, dict)}


def booked(service: Service) -> dict[str, list[str]]:
    """Each worker's key sets, as the service's books say."""
    return {w: sorted(service.store.store_of(w).names()) for w in service.store.workers()}


def where(service: Service, client: EncryptedClient) -> str | None:
    return service.store.where(name_of(next(iter(client.key_ids.values()))))


@pytest.fixture(scope="module")
def footprint(tiny_saved, models_dir, cache_dir):
    local = Service(config(models_dir, cache_dir))
    try:
        return local.host(tiny_saved).footprint
    finally:
        local.close()


@pytest.fixture(scope="module")
def cluster():
    from dask.distributed import LocalCluster

    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(REPO)  # the workers import engine.serve.cluster
    try:
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address="127.0.0.1:0") as c:  # a free loopback port
            yield c
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="module")
def dask_svc(cluster, tiny_saved, models_dir, cache_dir, footprint):
    # each worker holds two key sets of the tiny circuit
    s = RunningService(config(models_dir, cache_dir, backend="dask", scheduler=cluster.scheduler_address,
                              key_store_bytes=2 * footprint + footprint // 2, key_grace_s=0.0))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def cid(dask_svc, tiny_saved):
    return next(c["id"] for c in httpx.get(f"{dask_svc.url}/circuits").json() if c["model_hash"] == tiny_saved.hash)


@pytest.fixture(scope="module")
def feats(predictor, test_split):
    return predictor.features(test_split.images[:6])


def expected(predictor, x):
    c = predictor.compiled
    return c.dequantize(c.simulator.run(c.quantize(x))).argmax(1)


def test_placement_late_worker_and_a_killed_worker(dask_svc, cluster, cid, feats, predictor, tmp_path):
    service = dask_svc.service
    first = wait_for(lambda: service.store.workers())
    assert len(first) == 1
    a = EncryptedClient.download(HTTPTransport(dask_svc.url), cid, tmp_path / "a")
    la, _ = a.predict(feats[:1])
    assert la.argmax(1) == expected(predictor, feats[:1])

    # a worker that joins gets the circuit (the WorkerPlugin) and takes the next key sets
    cluster.scale(2)
    workers = wait_for(lambda: w if len(w := service.store.workers()) == 2 else None)
    late = next(w for w in workers if w not in first)
    states = service.runner.states()
    assert all(len(states[w]["circuits"]) == len(service.circuits) for w in workers)
    b = EncryptedClient.download(HTTPTransport(dask_svc.url), cid, tmp_path / "b")
    b.predict(feats[1:2])
    assert where(service, b) == late  # the most free key budget
    c = EncryptedClient.download(HTTPTransport(dask_svc.url), cid, tmp_path / "c")
    c.predict(feats[2:3])

    # each key set lives on exactly one worker, as the service and the workers both say
    held = holdings(service)
    names = [n for ks in held.values() for n in ks]
    assert len(names) == len(set(names)) == 3
    assert {w["worker"]: w["key_sets"] for w in service.workers()} == {w: len(ks) for w, ks in held.items()}
    runs_before = {w["worker"]: w["runs"] for w in service.workers()}
    assert sum(runs_before.values()) >= 3

    # kill -9 the worker holding a's keys while a, b and c keep predicting
    victim = where(service, a)
    pid = service.runner.client.run(os.getpid, workers=[victim])[victim]
    clients = [a, b, c]

    def keep_predicting(k):
        got = []
        for r in range(6):
            x = feats[(k + r) % len(feats)][None]
            logits, _ = clients[k].predict(x)
            got.append((x, logits))
            if k == 0 and r == 1:
                os.kill(pid, signal.SIGKILL)
                wait_for(lambda: victim not in service.store.workers(), 30)
        return got

    with ThreadPoolExecutor(3) as ex:
        answers = [r for part in ex.map(keep_predicting, range(3)) for r in part]
    for x, logits in answers:
        assert logits.argmax(1) == expected(predictor, x)
    assert [cl.uploads for cl in clients] == [1, 1, 1]  # nobody uploaded again
    assert service.replacements >= 1 and victim in service.store.left
    health = httpx.get(f"{dask_svc.url}/health").json()
    assert victim not in [w["worker"] for w in health["dask_workers"]]
    assert health["key_replacements"] == service.replacements
    held = holdings(service)
    names = [n for ks in held.values() for n in ks]
    assert len(names) == len(set(names)) == 3  # placed again, still once each
    assert held == booked(service)

    # a key set evicted from a worker, or forgotten by its client, leaves that worker too
    more = [EncryptedClient.download(HTTPTransport(dask_svc.url), cid, tmp_path / f"m{k}") for k in range(2)]
    for k, cl in enumerate(more):
        cl.predict(feats[k : k + 1])
    assert service.store.evictions >= 1  # 5 key sets, room for 4
    assert booked(service) == holdings(service) and len(service.store) == 4
    resident = next(cl for cl in clients + more if name_of(next(iter(cl.key_ids.values()))) in service.store)
    resident.close()  # forgets its keys
    assert booked(service) == holdings(service) and len(service.store) == 3
    # a key set a worker holds that the books do not place there (a registration the service gave
    # up on) is dropped by the sweep, on the second sweep that finds it
    w = service.store.workers()[0]
    service.runner.client.run(exec, "from engine.serve import cluster; cluster._W_KEYS['orphan'] = b'x'", workers=[w])
    assert "orphan" in holdings(service)[w]
    before = service.runner.orphans_dropped
    service.runner.sweep()
    service.runner.sweep()
    assert "orphan" not in holdings(service)[w] and service.runner.orphans_dropped > before
    assert booked(service) == holdings(service)  # and nothing booked was touched
    metrics = httpx.get(f"{dask_svc.url}/metrics").text
    held = holdings(service)
    for w in held:
        assert f'engine_worker_key_sets{{worker="{w}"}} {float(len(held[w]))}' in metrics
    assert f"engine_key_replacements {float(service.replacements)}" in metrics
    assert np.isfinite([lg for _, lg in answers]).all()


def test_tls_cluster(tiny_saved, models_dir, cache_dir, footprint, feats, predictor, tmp_path):
    """Ciphertexts and keys cross to the workers over TLS only (a CA made here)."""
    import trustme
    from dask.distributed import LocalCluster
    from distributed.security import Security

    from engine.serve.transports import InProcessTransport

    ca = trustme.CA()
    ca_file, pem = tmp_path / "ca.pem", tmp_path / "node.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(pem))
    sec = Security(tls_ca_file=str(ca_file), tls_scheduler_cert=str(pem), tls_scheduler_key=str(pem),
                   tls_worker_cert=str(pem), tls_worker_key=str(pem), tls_client_cert=str(pem),
                   tls_client_key=str(pem), require_encryption=True)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(REPO)
    try:
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, protocol="tls://", host="127.0.0.1",
                          security=sec, dashboard_address="127.0.0.1:0") as cluster:
            assert cluster.scheduler_address.startswith("tls://")
            with pytest.raises(ValueError, match="go together"):
                config(models_dir, cache_dir, backend="dask", scheduler=cluster.scheduler_address,
                       dask_tls_ca=str(ca_file))
            s = Service(config(models_dir, cache_dir, backend="dask", scheduler=cluster.scheduler_address,
                               key_store_bytes=2 * footprint, dask_tls_ca=str(ca_file), dask_tls_cert=str(pem),
                               dask_tls_key=str(pem)))
            try:
                cid = s.host(tiny_saved).id
                s.ready = True
                client = EncryptedClient(InProcessTransport(s), cid, predictor.ensure_client(), keep_evaluation_keys=True)
                logits, _ = client.predict(feats[:1])
                assert logits.argmax(1) == expected(predictor, feats[:1])
                assert all(w.startswith("tls://") for w in s.store.workers()) and len(s.store) == 1
            finally:
                s.close()
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
