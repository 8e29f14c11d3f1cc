"""The HTTP service on loopback ports with the real tiny circuit: predictions, every error path,
fuzzing of the POST routes, key isolation, eviction and re-upload, replicas, the Dask backend."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.serve.client import EncryptedClient, find_circuit

from engine.serve.transports import HTTPTransport, InProcessTransport
from engine.config import ServiceConfig
from engine.serve.hosting import Service
from engine.serve.ports import free_port


class RunningService:
    """``engine.serve.api`` under uvicorn in a thread, on a free loopback port."""

    def __init__(self, config: ServiceConfig, port: int | None = None):
        import uvicorn

        from engine.serve.api import create_app

        self.service = Service(config)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(self.service)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("service did not become healthy")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.service.close()


def config(models_dir, cache_dir, **kw) -> ServiceConfig:
    return ServiceConfig(**{"models_dir": str(models_dir), "cache_dir": str(cache_dir), **kw})


@pytest.fixture(scope="module")
def svc(tiny_saved, models_dir, cache_dir):
    s = RunningService(config(models_dir, cache_dir, key_grace_s=0.0, max_queue=8))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def circuit(svc, tiny_saved):
    listed = httpx.get(f"{svc.url}/circuits").json()
    return next(c for c in listed if c["model_hash"] == tiny_saved.hash)


@pytest.fixture(scope="module")
def feats(predictor, test_split):
    return predictor.features(test_split.images[:6])


def new_client(svc, circuit, tmp_path, **kw) -> EncryptedClient:
    return EncryptedClient.download(HTTPTransport(svc.url), circuit["id"], tmp_path, **kw)


def test_health_circuits_and_client_zip(svc, circuit, predictor):
    h = httpx.get(f"{svc.url}/health").json()
    assert h["status"] == "ok" and h["circuits"] >= 1
    assert circuit["pbs_count"] == predictor.compiled.report.pbs_count
    assert circuit["input_shape"] == [1, 784] and circuit["compile"]["rounding_threshold_bits"] == 4
    r = httpx.get(f"{svc.url}/circuits/{circuit['id']}/client.zip")
    assert r.status_code == 200 and r.content[:2] == b"PK"
    assert r.content == (predictor.compiled.deployment_dir / "client.zip").read_bytes()


def test_http_predictions_equal_simulation(svc, circuit, predictor, feats, tmp_path):
    client = new_client(svc, circuit, tmp_path)
    got = np.concatenate([client.predict(feats[i : i + 1])[0] for i in range(len(feats))]).argmax(1)
    expected = np.concatenate([predictor.compiled.dequantize(predictor.compiled.simulator.run(
        predictor.compiled.quantize(feats[i : i + 1]))) for i in range(len(feats))]).argmax(1)
    assert np.array_equal(got, expected)
    assert client.uploads == 1  # the keys went once
    assert client.fhe._eval_keys is None  # only the secret keys stay on the client
    assert client.fhe.forget_evaluation_keys() < 200_000


def test_error_paths_answer_and_service_keeps_serving(svc, circuit, feats, tmp_path):
    base, cid = svc.url, circuit["id"]
    client = new_client(svc, circuit, tmp_path)
    good_ct = client.fhe.encrypt(feats[:1])
    key_id = client.register()
    octet = {"content-type": "application/octet-stream"}

    def post(path, body, **headers):
        r = httpx.post(f"{base}{path}", content=body, headers={**octet, **headers}, timeout=60)
        assert r.headers["content-type"].startswith("application/json") or r.status_code == 200
        return r

    r = post("/circuits/nope/predict", good_ct, **{"x-key-id": key_id})
    assert r.status_code == 404 and "unknown circuit" in r.json()["error"]
    assert post("/circuits/nope/keys", b"x").status_code == 404
    r = post(f"/circuits/{cid}/predict", good_ct, **{"x-key-id": "not-a-key"})
    assert r.status_code == 404 and "upload the evaluation keys again" in r.json()["error"]
    assert post(f"/circuits/{cid}/predict", good_ct).status_code == 404  # no key header
    r = post(f"/circuits/{cid}/predict", b"\x00" * len(good_ct), **{"x-key-id": key_id})
    assert r.status_code == 400 and "malformed ciphertext" in r.json()["error"]
    assert post(f"/circuits/{cid}/predict", good_ct[:-7], **{"x-key-id": key_id}).status_code == 400
    assert post(f"/circuits/{cid}/keys", b"garbage").status_code == 400
    r = post(f"/circuits/{cid}/predict", good_ct + bytes(8192), **{"x-key-id": key_id})
    assert r.status_code == 413
    r = post(f"/circuits/{cid}/keys", b"\x00" * (circuit["evaluation_key_bytes"] * 2))
    assert r.status_code == 413
    assert httpx.get(f"{base}/no/such/route").status_code == 404
    # ...and the next good request is answered
    r = post(f"/circuits/{cid}/predict", good_ct, **{"x-key-id": key_id})
    assert r.status_code == 200 and float(r.headers["x-server-seconds"]) > 0
    assert np.asarray(client.fhe.decrypt(r.content)).shape == (1, 2)


def test_evicted_key_is_uploaded_again_without_the_caller_noticing(svc, circuit, feats, tmp_path):
    a = new_client(svc, circuit, tmp_path / "a")
    first, _ = a.predict(feats[:1])
    assert httpx.delete(f"{svc.url}/circuits/{circuit['id']}/keys/{a.key_ids[svc.url]}").json()["removed"]
    again, ex = a.predict(feats[:1])  # 404 inside, then fresh evaluation keys from the same secret
    assert ex.key_uploads == 1 and a.uploads == 2
    assert np.allclose(first, again)


def test_key_sets_leave_memory_and_come_back_from_the_key_folder_without_a_reupload(
        tiny_saved, models_dir, cache_dir, feats, tmp_path):
    probe = Service(config(models_dir, cache_dir))
    c = probe.host(tiny_saved)
    probe.close()
    # Memory for two key sets: a third registration pushes the least recently used one out of
    # memory; it stays serialized in the key folder and comes back from there.
    key_dir = tmp_path / "keys"
    cfg = config(models_dir, cache_dir, key_store_bytes=int(2.5 * c.footprint), key_linger_s=0.0, key_dir=str(key_dir))
    s = RunningService(cfg)
    try:
        circuit = {"id": c.id}
        clients = [new_client(s, circuit, tmp_path / str(k)) for k in range(3)]
        first = [cl.predict(feats[:1])[0] for cl in clients]
        assert s.service.store.evictions == 1 and len(s.service.store) == 2 and len(s.service.vault) == 3
        assert len(list(key_dir.glob("*.keys"))) == 3
        again, _ = clients[0].predict(feats[:1])  # out of memory: reloaded by the server
        assert np.allclose(again, first[0])
        assert [cl.uploads for cl in clients] == [1, 1, 1] and s.service.reloads == 1
        metrics = HTTPTransport(s.url).metrics()
        assert metrics["engine_key_store_entries"] == 2 and metrics["engine_key_store_evictions"] == 2
        assert metrics["engine_key_reloads"] == 1 and metrics["engine_key_dir_entries"] == 3
        assert metrics["engine_key_store_bytes"] == 2 * s.service.circuits[c.id].footprint and metrics["engine_process_rss_bytes"] > 0
    finally:
        s.stop()
    # A restart with the same key folder: the most recent key sets are in memory before the
    # service says it is ready, every client is answered without uploading again...
    s = RunningService(cfg, port=s.port)
    try:
        assert len(s.service.store) == 2 and s.service.reloads == 2
        for cl, expected in zip(clients, first):
            assert np.allclose(cl.predict(feats[:1])[0], expected)
        assert [cl.uploads for cl in clients] == [1, 1, 1]
    finally:
        s.stop()
    # ...and a corrupt key file is discarded and reported, never served: its client uploads again.
    victim = sorted(key_dir.glob("*.keys"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    (key_dir / ".half-written.keys.tmp").write_bytes(b"x" * 10)
    s = RunningService(cfg, port=s.port)
    try:
        assert not (key_dir / ".half-written.keys.tmp").exists()
        for cl, expected in zip(clients, first):
            assert np.allclose(cl.predict(feats[:1])[0], expected)
        assert sorted(cl.uploads for cl in clients) == [1, 1, 2]
        assert any("SHA-256" in d for d in s.service.discards) and s.service.vault.discarded == 2
    finally:
        s.stop()


def test_full_queue_answers_429_with_retry_after(tiny_saved, models_dir, cache_dir, feats, tmp_path):
    s = RunningService(config(models_dir, cache_dir, max_queue=1, workers=1, key_grace_s=0.0))
    gate = threading.Event()
    try:
        cid = s.service.host(tiny_saved).id
        client = new_client(s, {"id": cid}, tmp_path)
        key_id = client.register()
        ct = client.fhe.encrypt(feats[:1])
        blocker = s.service.pool.submit("someone-else", gate.wait)  # the one worker is busy...
        time.sleep(0.2)
        s.service.pool.submit("someone-else", lambda: None)  # ...and the one queue slot taken
        r = httpx.post(f"{s.url}/circuits/{cid}/predict", content=ct, headers={"x-key-id": key_id})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "queue is full" in r.json()["error"]
        gate.set()
        blocker.result(timeout=30)
        r = httpx.post(f"{s.url}/circuits/{cid}/predict", content=ct, headers={"x-key-id": key_id})
        assert r.status_code == 200
        text = httpx.get(f"{s.url}/metrics").text
        assert 'engine_requests_total{route="/circuits/{cid}/predict",status="429"} 1.0' in text
        assert "engine_predict_requests_total 2.0" in text and "engine_queue_depth" in text
    finally:
        gate.set()
        s.stop()


def test_fair_queue_serves_clients_in_turn():
    from engine.serve.workpool import WorkPool

    pool = WorkPool(workers=1, max_queue=100)
    gate, order = threading.Event(), []
    pool.submit("gate", gate.wait)
    time.sleep(0.1)
    futures = [pool.submit("a", order.append, f"a{i}") for i in range(4)]
    futures += [pool.submit("b", order.append, f"b{i}") for i in range(2)]
    gate.set()
    [f.result(timeout=10) for f in futures]
    pool.close()
    assert order == ["a0", "b0", "a1", "b1", "a2", "a3"]  # b does not wait behind a's burst


def test_tenants_share_first_then_their_clients():
    """The dashboard (one token, many sessions) gets one tenant's share, not one per session;
    and a job whose keys must be loaded lets a ready one go first, within the patience."""
    from engine.serve.workpool import WorkPool

    pool = WorkPool(workers=1, max_queue=100, cold_patience_s=30.0)
    gate, order = threading.Event(), []
    pool.submit("gate", gate.wait)
    time.sleep(0.1)
    futures = [pool.submit(f"s{i}", order.append, f"dash-s{i}", tenant="dashboard") for i in range(4)]
    futures += [pool.submit("h", order.append, f"hosp-{i}", tenant="hospital") for i in range(2)]
    futures.append(pool.submit("cold", order.append, "cold", tenant="clinic", cold=True))
    futures.append(pool.submit("warm", order.append, "warm", tenant="clinic"))
    gate.set()
    [f.result(timeout=10) for f in futures]
    pool.close()
    assert order == ["dash-s0", "hosp-0", "warm", "dash-s1", "hosp-1", "dash-s2", "dash-s3", "cold"]
    impatient = WorkPool(workers=1, max_queue=100, cold_patience_s=0.0)
    gate, order = threading.Event(), []
    impatient.submit("gate", gate.wait)
    time.sleep(0.1)
    futures = [impatient.submit("cold", order.append, "cold", cold=True), impatient.submit("warm", order.append, "warm")]
    gate.set()
    [f.result(timeout=10) for f in futures]
    impatient.close()
    assert order == ["cold", "warm"]  # past its patience a cold job takes its turn


def test_background_work_waits_for_predictions():
    from engine.serve.workpool import WorkPool

    pool = WorkPool(workers=1, max_queue=100)
    gate, order = threading.Event(), []
    pool.submit("gate", gate.wait)
    time.sleep(0.1)
    futures = [pool.submit("warm", order.append, "warm-up", background=True)]
    futures += [pool.submit(c, order.append, c) for c in ("a", "b")]
    gate.set()
    [f.result(timeout=10) for f in futures]
    assert pool.depth == 0
    pool.close()
    assert order == ["a", "b", "warm-up"]  # submitted first, run last

def test_a_client_never_has_two_runs_at_once():
    """Two workers: one client's jobs run one after the other (concurrent Concrete runs on one
    key set can crash the process), while another client's job uses the second worker."""
    from engine.serve.workpool import WorkPool

    pool = WorkPool(workers=2, max_queue=100)
    lock, running, spans = threading.Lock(), {}, []

    def job(owner: str, name: str) -> None:
        with lock:
            running[owner] = running.get(owner, 0) + 1
            spans.append((name, running[owner], sum(running.values())))
        time.sleep(0.2)
        with lock:
            running[owner] -= 1

    futures = [pool.submit("a", job, "a", f"a{i}") for i in range(3)] + [pool.submit("b", job, "b", "b0")]
    [f.result(timeout=10) for f in futures]
    pool.close()
    assert all(mine == 1 for _, mine, _ in spans)  # never two runs of one client at once
    assert [name for name, _, _ in spans if name.startswith("a")] == ["a0", "a1", "a2"]
    assert max(total for _, _, total in spans) == 2  # b ran beside a: the second worker was used



def test_a_lone_run_spreads_over_every_core_runs_side_by_side_use_one_each():
    """Each job is told its threads before it runs: every core when nothing else runs or waits,
    one when the workers are shared."""
    from engine.serve.workpool import WorkPool

    told = threading.local()
    pool = WorkPool(workers=2, max_queue=100, threads=lambda n: setattr(told, "n", n))

    def job(hold: float = 0.0) -> int:
        time.sleep(hold)
        return told.n

    assert pool.run("a", job)[0] == 2  # alone
    crowd = [pool.submit("c0", job, 0.3)]
    time.sleep(0.1)  # c0 has started, alone
    crowd += [pool.submit(f"c{i}", job, 0.2) for i in range(1, 4)]
    threads = [f.result(timeout=10)[0] for f in crowd]
    assert threads[0] == 2 and threads[1:] == [1, 1, 1]  # the first started alone; the rest shared
    assert pool.run("a", job)[0] == 2  # alone again
    pool.close()
    one = WorkPool(workers=1, max_queue=100, threads=lambda n: setattr(told, "n", n), cores=2)
    crowd = [one.submit(f"c{i}", job, 0.05) for i in range(3)]
    assert [f.result(timeout=10)[0] for f in crowd] == [2, 2, 2]  # one worker: every run has both cores
    one.close()


def test_two_interleaved_clients_decrypt_only_their_own(svc, circuit, feats, tmp_path):
    a, b = new_client(svc, circuit, tmp_path / "a"), new_client(svc, circuit, tmp_path / "b")
    outs = []
    for i in range(3):  # interleaved: a, b, a, b, ...
        la, ea = a.predict(feats[i : i + 1])
        lb, eb = b.predict(feats[i : i + 1])
        outs.append((la, ea, lb, eb))
    gaps = []
    for la, ea, lb, eb in outs:
        assert np.allclose(la, lb)  # same image, same answer, each with its own key
        wrong = np.asarray(b.fhe.decrypt(ea.result))
        gaps.append(np.abs(wrong - la).max())
    # a's results under b's key are noise: a few output values, each random in the output's small
    # range, may land near the right ones by chance for one result, not for all three
    assert max(gaps) > 1.0 and sum(g > 1e-6 for g in gaps) >= 2, gaps
    assert a.key_ids[svc.url] != b.key_ids[svc.url]


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_post_routes_never_5xx(svc, circuit, fuzz_material, data):
    keys, ct, key_id = fuzz_material
    target = data.draw(st.sampled_from(["keys", "predict"]))
    valid = keys if target == "keys" else ct
    kind = data.draw(st.sampled_from(["random", "mutated", "truncated", "extended"]))
    if kind == "random":
        body = data.draw(st.binary(max_size=4096))
    elif kind == "mutated":
        buf = bytearray(valid)
        for _ in range(data.draw(st.integers(1, 8))):
            buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
        body = bytes(buf)
    elif kind == "truncated":
        body = valid[: data.draw(st.integers(0, len(valid) - 1))]
    else:
        body = valid + data.draw(st.binary(min_size=1, max_size=64))
    headers = {"content-type": "application/octet-stream"}
    if target == "predict":
        headers["x-key-id"] = data.draw(st.sampled_from([key_id, "", "x" * 40]))
    r = httpx.post(f"{svc.url}/circuits/{circuit['id']}/{target}", content=body, headers=headers, timeout=120)
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert "error" in r.json()


@pytest.fixture(scope="module")
def fuzz_material(svc, circuit, feats, tmp_path_factory):
    client = new_client(svc, circuit, tmp_path_factory.mktemp("fuzz"), keep_evaluation_keys=True)
    key_id = client.register()
    yield client.fhe.evaluation_keys(), client.fhe.encrypt(feats[:1]), key_id
    # After the fuzzing: the process is alive and a good request is answered.
    assert httpx.get(f"{svc.url}/health").status_code == 200
    logits, _ = client.predict(feats[:1])
    assert logits.shape == (1, 2)


def test_two_replicas_behind_one_client(tiny_saved, models_dir, cache_dir, feats, predictor, tmp_path):
    r1 = RunningService(config(models_dir, cache_dir))
    r2 = RunningService(config(models_dir, cache_dir))
    try:
        cid = r1.service.host(tiny_saved).id
        client = EncryptedClient.download(HTTPTransport([r1.url, r2.url]), cid, tmp_path)
        results = [client.predict(feats[i : i + 1]) for i in range(4)]
        assert [ex.endpoint for _, ex in results] == [r1.url, r2.url, r1.url, r2.url]
        assert set(client.key_ids) == {r1.url, r2.url} and client.uploads == 2
        r1.stop()  # one replica goes away: the client keeps getting answers from the other
        logits, ex = client.predict(feats[:1])
        assert ex.endpoint == r2.url and np.allclose(logits, results[0][0])
    finally:
        r2.stop()
        if r1.thread.is_alive():
            r1.stop()


def test_batched_twin_runs_with_the_keys_of_the_single_circuit(tiny_saved, models_dir, cache_dir, feats, predictor,
                                                                 tmp_path):
    """``serve --batch-size 3``: each model also has a circuit for 3 images per request, which
    runs with the key set registered for the 1-image circuit (one upload serves both)."""
    s = RunningService(config(models_dir, cache_dir, batch_size=3, key_grace_s=0.0))
    try:
        listed = [c for c in httpx.get(f"{s.url}/circuits").json() if c["model_hash"] == tiny_saved.hash]
        single = next(c for c in listed if c["batch_size"] == 1)
        batched = next(c for c in listed if c["batch_size"] == 3)
        assert batched["keys_from"] == single["keys_from"] == single["id"] != batched["id"]
        assert batched["input_shape"] == [3, single["input_shape"][1]]

        one = EncryptedClient.download(HTTPTransport(s.url), single["id"], tmp_path)
        first, ex_one = one.predict(feats[:1])
        many = one.twin(batched["id"], tmp_path)
        a, ex_a = many.predict(feats[1:4])
        b, _ = many.predict(feats[4:6])  # 2 images, padded to 3
        assert one.uploads == 1 and many.uploads == 0  # the twin used the same key id
        assert len(ex_a.ciphertext) == batched["ciphertext_bytes"] > single["ciphertext_bytes"]
        assert np.allclose(np.concatenate([first, a, b]), predictor.compiled.run_clear(feats[:6]))  # exact rounding

        # A dashboard or CLI looking for the model's circuit by its settings finds the 1-image
        # one, also when the settings come from before batch_size existed.
        old_style = {k: v for k, v in tiny_saved.config.compile.__dict__.items() if k != "batch_size"}
        for settings_ in (None, old_style, {**old_style, "batch_size": 1}):
            assert find_circuit(HTTPTransport(s.url), tiny_saved.dataset, tiny_saved.hash, settings_)["id"] == single["id"]

        key_id = next(iter(one.key_ids.values()))
        wrong = httpx.post(f"{s.url}/circuits/{batched['id']}/predict", content=ex_one.ciphertext,
                           headers={"X-Key-Id": key_id, "Content-Type": "application/octet-stream"})
        assert wrong.status_code in (400, 422, 413) and "error" in wrong.json()  # a 1-image ciphertext
        again, _ = many.predict(feats[1:4])
        assert np.allclose(again, a)  # and the service keeps serving
    finally:
        s.stop()


def test_batched_twins_need_the_local_backend():
    with pytest.raises(ValueError, match="local backend"):
        ServiceConfig(backend="dask", scheduler="tcp://127.0.0.1:8786", batch_size=2)
    with pytest.raises(ValueError, match="batch size"):
        ServiceConfig(batch_size=0)


def test_dask_backend_equals_local_pool(tiny_saved, models_dir, cache_dir, feats, predictor, monkeypatch):
    from dask.distributed import LocalCluster

    from conftest import REPO

    monkeypatch.setenv("PYTHONPATH", str(REPO))
    local = Service(config(models_dir, cache_dir))
    cid = local.host(tiny_saved).id
    local.ready = True
    client_fhe = predictor.ensure_client()
    a = EncryptedClient(InProcessTransport(local), cid, client_fhe, keep_evaluation_keys=True)
    expected = [a.predict(feats[i : i + 1])[0] for i in range(3)]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        remote = Service(config(models_dir, cache_dir, backend="dask", scheduler=cluster.scheduler_address))
        try:
            remote.host(tiny_saved)
            assert len(remote.store.workers()) == 2  # each worker with its own key store
            b = EncryptedClient(InProcessTransport(remote), cid, client_fhe, keep_evaluation_keys=True)
            with ThreadPoolExecutor(3) as ex:
                got = list(ex.map(lambda i: b.predict(feats[i : i + 1])[0], range(3)))
        finally:
            remote.close()
    local.close()
    for e, g in zip(expected, got):
        assert np.allclose(e, g)


def test_key_pool_hands_each_user_fresh_ready_keys(svc, circuit, predictor, feats, tmp_path):
    from dashboard.keysets import KeyPool

    transport = HTTPTransport(svc.url)
    pool = KeyPool(lambda: transport, circuit["id"], tmp_path, spares=1, makers=1)
    a, b = pool.take(), pool.take()
    assert a is not b and a.key_ids[svc.url] != b.key_ids[svc.url]
    assert a.fhe._eval_keys is None and b.fhe._eval_keys is None  # secret keys only, already uploaded
    assert pool.apart  # over HTTP the keys were made in a key-maker process, not here
    assert len(a.fhe.secret_keyset()) < 1_000_000
    la, ex = a.predict(feats[:1])
    assert ex.key_uploads == 0  # the first prediction needs no upload
    assert not np.allclose(np.asarray(b.fhe.decrypt(ex.result)), la)
    x = feats[:1]
    expected = predictor.compiled.dequantize(predictor.compiled.simulator.run(predictor.compiled.quantize(x)))
    assert np.array_equal(a.predict(x)[0].argmax(1), expected.argmax(1))
    pool.close()


def test_both_transports_raise_the_same_client_exception_for_every_service_error(tiny_saved, models_dir, cache_dir,
                                                                                   feats, tmp_path):
    """Each error the service can answer (400, 404 unknown circuit, 404 unknown key, 413, 429, 507)
    reaches a client as the same exception, with the same status, in-process and over HTTP."""
    from engine.serve.client import KeyGone, Rejected, Retry
    from engine.serve.transports import InProcessTransport

    busy = RunningService(config(models_dir, cache_dir, max_queue=1, workers=1, key_grace_s=0.0))
    small = RunningService(config(models_dir, cache_dir, key_store_bytes=4096))
    gate = threading.Event()
    try:
        cid = busy.service.host(tiny_saved).id
        small.service.host(tiny_saved)
        client = new_client(busy, {"id": cid}, tmp_path)
        key_id = client.register()
        ct = client.fhe.encrypt(feats[:1])
        size = busy.service.circuit(cid).key_bytes
        keys = client.fhe.evaluation_keys()

        def met(transport, call):
            try:
                call(transport)
            except (Rejected, KeyGone, Retry) as exc:
                return type(exc).__name__, getattr(exc, "status", None)
            return None

        cases = {
            "malformed keys": (busy, lambda t: t.upload_keys(t.endpoints()[0], cid, b"garbage")),
            "keys too large": (busy, lambda t: t.upload_keys(t.endpoints()[0], cid, bytes(2 * size))),
            "unknown circuit": (busy, lambda t: t.upload_keys(t.endpoints()[0], "nope", b"x")),
            "unknown key": (busy, lambda t: t.predict(t.endpoints()[0], cid, "not-a-key", ct)),
            "malformed ciphertext": (busy, lambda t: t.predict(t.endpoints()[0], cid, key_id, bytes(len(ct)))),
            "no storage": (small, lambda t: t.upload_keys(t.endpoints()[0], cid, keys)),
        }
        expected = {"malformed keys": ("Rejected", 400), "keys too large": ("Rejected", 413),
                    "unknown circuit": ("Rejected", 404), "unknown key": ("KeyGone", None),
                    "malformed ciphertext": ("Rejected", 400), "no storage": ("Rejected", 507)}
        for name, (where, call) in cases.items():
            got = [met(t, call) for t in (InProcessTransport(where.service), HTTPTransport(where.url))]
            assert got == [expected[name]] * 2, (name, got)
        blocker = busy.service.pool.submit("someone-else", gate.wait)  # the one worker busy, the one slot taken
        time.sleep(0.2)
        busy.service.pool.submit("someone-else", lambda: None)
        full = [met(t, lambda t: t.predict(t.endpoints()[0], cid, key_id, ct))
                for t in (InProcessTransport(busy.service), HTTPTransport(busy.url))]
        assert full == [("Retry", None)] * 2
        gate.set()
        blocker.result(timeout=30)
    finally:
        gate.set()
        busy.stop()
        small.stop()


def test_loadtest_reports_a_load_whose_requests_all_failed(tiny_saved, models_dir, cache_dir, capsys):
    """A key store too small for one key set: every upload is refused (507, not a 500), and
    loadtest prints the failures by kind and exits 1 instead of crashing."""
    from engine.cli import main

    s = RunningService(config(models_dir, cache_dir, key_store_bytes=4096))
    try:
        code = main(["loadtest", "--server", s.url, "--clients", "2", "--requests", "1", "--dataset",
                     tiny_saved.dataset, "--model", tiny_saved.name])
        out = capsys.readouterr().out
        assert code == 1
        assert "0 answered, 2 errors" in out and "2 failed: upload: Rejected" in out
        m = httpx.get(f"{s.url}/metrics").text
        assert 'route="/circuits/{cid}/keys",status="507"' in m and 'status="500"' not in m
    finally:
        s.stop()
