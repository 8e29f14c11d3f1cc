"""Real Concrete ML on a tiny 784-8-2 circuit: compile, cache, keys, four modes."""

import json
import shutil

import numpy as np
import pytest
from joblib import Parallel, delayed

from engine.config import CompileConfig
from engine.fhe.keys import FHEClient
from engine.fhe.runtime import FHEServer
from engine.fhe.circuit import compile_model, load_entry


def test_compile_report(predictor, tiny_saved, tmp_path):
    r = predictor.compiled.report
    assert 2 <= r.max_bit_width <= 16
    assert r.compile["rounding_threshold_bits"] == 4 and r.versions["concrete-ml"] == "1.9.0"
    # One lookup per hidden neuron with approximate rounding; exact rounding adds lookups.
    approx = compile_model(tiny_saved, CompileConfig(rounding_threshold_bits=4, p_error=0.01, inputset_size=128), tmp_path)
    assert approx.report.pbs_count == 8 and r.pbs_count > 8


def test_second_compile_comes_from_cache(predictor, tiny_saved, cache_dir):
    again = compile_model(tiny_saved, predictor.compile_config or tiny_saved.config.compile, cache_dir)
    assert again.report.from_cache and again.path == predictor.compiled.path
    other = compile_model(tiny_saved, CompileConfig(rounding_threshold_bits=5, p_error=0.05, inputset_size=128), cache_dir)
    assert not other.report.from_cache and other.path != again.path


def test_four_modes_agree(predictor, test_split):
    imgs = test_split.subset(np.arange(0, 120, 20)).images  # 6 images
    res = predictor.run(imgs, "all")
    assert list(res) == ["float", "quantized", "simulate", "fhe"]
    assert np.array_equal(res["simulate"].predictions, res["fhe"].predictions)
    # Same integers in clear and simulation (exact rounding, p_error 1e-5)
    assert np.array_equal(res["quantized"].predictions, res["simulate"].predictions)
    fhe = res["fhe"]
    assert set(fhe.stages) == {"encrypt_s", "queue_s", "server_s", "network_s", "decrypt_s"}
    assert all(len(v) == 6 for v in fhe.stages.values())
    assert all((fhe.stages[s] > 0).all() for s in ("encrypt_s", "server_s", "decrypt_s"))
    assert fhe.wire["sent_bytes"] == 6 * fhe.sizes["ciphertext_bytes"] and fhe.wire["endpoint"] == "in-process"
    assert fhe.sizes["ciphertext_bytes"] > 784 and fhe.sizes["eval_key_bytes"] > 1000
    assert np.allclose(fhe.scores.sum(axis=1), 1)


def _serve(server_only_dir, ciphertext, eval_keys):
    # Another process, given only server.zip and bytes: what a remote server has.
    return FHEServer(server_only_dir).run(ciphertext, eval_keys)


def test_server_needs_only_server_zip_and_bytes(predictor, test_split, tmp_path):
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    shutil.copy(predictor.compiled.deployment_dir / "server.zip", server_dir)
    client = predictor.ensure_client()

    feats = predictor.features(test_split.images[:2])
    jobs = [delayed(_serve)(server_dir, client.encrypt(feats[i : i + 1]), client.evaluation_keys()) for i in range(2)]
    outs = Parallel(n_jobs=2, backend="loky")(jobs)
    remote = np.concatenate([client.decrypt(o) for o in outs]).argmax(1)
    local = predictor.run(test_split.images[:2], "simulate")["simulate"].predictions
    assert np.array_equal(remote, local)
    assert sorted(p.name for p in server_dir.iterdir()) == ["server.zip"]


def test_keys_persist_in_client_key_dir(predictor, tmp_path, test_split):
    a = FHEClient(predictor.compiled, tmp_path / "k")
    a.keygen()
    assert any((tmp_path / "k").rglob("*")), "keys were not written to the client's key folder"
    b = FHEClient(predictor.compiled, tmp_path / "k")
    b.keygen()
    ct = a.encrypt(predictor.features(test_split.images[:1]))
    res = predictor.ensure_server().run(ct, a.evaluation_keys())
    assert np.allclose(a.decrypt(res), b.decrypt(res))  # same key pair, loaded from disk


def test_client_does_what_concrete_ml_client_does(predictor, test_split, tmp_path):
    """FHEClient runs on Concrete's compiler runtime alone; concrete-ml's own client, given the
    same keys, must quantize, encrypt and decrypt alike, and the client must not load concrete-ml."""
    import subprocess
    import sys

    from concrete.ml.deployment import FHEModelClient

    ours = FHEClient(predictor.compiled)
    ours.keygen()
    theirs = FHEModelClient(str(predictor.compiled.deployment_dir))
    theirs.client.keys._keyset = ours._keyset  # the same keys
    feats = predictor.features(test_split.images[:2])
    assert np.array_equal(ours.quantize(feats[:1]), theirs.model.quantize_input(feats[:1]))
    server = predictor.ensure_server()
    for i in range(2):
        x = feats[i : i + 1]
        for ct in (ours.encrypt(x), theirs.quantize_encrypt_serialize(x)):
            res = server.run(ct, ours.evaluation_keys())
            assert np.array_equal(ours.decrypt(res), theirs.deserialize_decrypt_dequantize(res))
    # Fresh random keys for each client, as concrete's default (the fixture's client made its own)
    def secret(c):
        return c._keyset.get_client_keys().get_secret_keys()[0].serialize()

    other = predictor.ensure_client()
    other.keygen()
    assert secret(ours) != secret(other)
    # A client process loads no concrete-ml, concrete-python or torch (here with the same secret keys)
    (tmp_path / "secret").write_bytes(ours.secret_keyset())
    code = ("import sys, numpy as np; from pathlib import Path; from engine.fhe.keys import FHEClient; "
            f"c = FHEClient({str(predictor.compiled.deployment_dir)!r}); "
            f"c.adopt_secret_keys(Path({str(tmp_path / 'secret')!r}).read_bytes()); c.encrypt(np.zeros((1, {feats.shape[1]}))); "
            "print(sorted(m for m in ('concrete.ml', 'concrete.fhe', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


_AFTER_A_RUN = """
import socket, sys
import numpy as np
from engine.fhe.keys import FHEClient
from engine.fhe.runtime import FHEServer
client, server = FHEClient(sys.argv[1]), FHEServer(sys.argv[1], library=sys.argv[4])
ct = client.encrypt(np.zeros((1, int(sys.argv[2]))))
def write_to_closed_socket():
    a, b = socket.socketpair()
    b.close()
    try:
        a.send(b"x")
        a.send(b"x")
    except BrokenPipeError:
        print("EPIPE", flush=True)
if sys.argv[3] == "bare":  # Concrete's own call, without what FHEServer.execute does after it
    from concrete.compiler import TransportValue
    server._idle[0].call([TransportValue.deserialize(ct)], server.load_keys(client.evaluation_keys()))
    write_to_closed_socket()
else:
    server.run(ct, client.evaluation_keys())
    write_to_closed_socket()
    # simulation installs the same handler in a fresh process (the dashboard simulates)
    from pathlib import Path
    from engine.fhe.simulate import Simulator
    Simulator(Path(sys.argv[1]) / "server.zip").run(client.quantize(np.zeros((1, int(sys.argv[2])))))
    write_to_closed_socket()
"""


def test_a_closed_socket_does_not_kill_a_process_that_ran_a_circuit(predictor, tmp_path):
    """Concrete's runtime installs a SIGPIPE handler that aborts the process at its first run: a
    client that went away while the service wrote to it took the service down. After
    FHEServer's runs and simulations, writing to a closed socket is an error again, as Python
    means it to be."""
    import subprocess
    import sys

    from engine.fhe.runtime import warmup_material

    deployment = tmp_path / "d"
    shutil.copytree(predictor.compiled.deployment_dir, deployment)
    library = str(warmup_material(predictor.compiled).library)  # built once for the circuit (the service's)
    args = [sys.executable, "-c", _AFTER_A_RUN, str(deployment), str(predictor.compiled.report.input_shape[1])]
    ours = subprocess.run(args + ["engine", library], capture_output=True, text=True, timeout=300)
    assert ours.returncode == 0 and ours.stdout.split() == ["EPIPE", "EPIPE"], ours.stderr[-2000:]
    bare = subprocess.run(args + ["bare", library], capture_output=True, text=True, timeout=300)
    assert bare.returncode != 0 and "Broken pipe" in bare.stderr, "Concrete no longer aborts on SIGPIPE: the guard may go"


def _corrupt_and_recompile(tiny_saved, cache_dir, damage):
    cc = tiny_saved.config.compile
    first = compile_model(tiny_saved, cc, cache_dir)
    damage(first.path)
    messages = []
    again = compile_model(tiny_saved, cc, cache_dir, progress=messages.append)
    assert not again.report.from_cache
    assert any("rebuilding" in m for m in messages)
    assert compile_model(tiny_saved, cc, cache_dir).report.from_cache
    return again


def test_entries_from_before_batching_load_as_one_image_circuits(predictor, tmp_path):
    """A cache entry written before ``batch_size`` existed has no such field in its report: it
    loads as the 1-image circuit it is, with complete settings (services and dashboards compare them)."""
    old = tmp_path / predictor.compiled.path.name
    shutil.copytree(predictor.compiled.path, old)
    report = json.loads((old / "report.json").read_text())
    del report["compile"]["batch_size"]
    (old / "report.json").write_text(json.dumps(report))
    loaded = load_entry(old)
    assert loaded.report.compile == predictor.compiled.report.compile
    assert loaded.report.compile["batch_size"] == 1 and loaded.batch_size == 1


def test_corrupt_cache_entries_are_rebuilt(tiny_saved, tmp_path):
    def truncate(path):
        z = path / "deployment" / "server.zip"
        z.write_bytes(z.read_bytes()[:100])

    _corrupt_and_recompile(tiny_saved, tmp_path, truncate)
    _corrupt_and_recompile(tiny_saved, tmp_path, lambda p: (p / "report.json").unlink())
    _corrupt_and_recompile(tiny_saved, tmp_path, lambda p: (p / "quantized_module.json").write_text("{"))


def _compile_in_process(saved, cache_dir):
    c = compile_model(saved, saved.config.compile, cache_dir)
    return str(c.path)


def test_concurrent_compiles_leave_one_valid_entry(tiny_saved, tmp_path):
    paths = Parallel(n_jobs=2, backend="loky")(delayed(_compile_in_process)(tiny_saved, tmp_path) for _ in range(2))
    assert paths[0] == paths[1]
    assert compile_model(tiny_saved, tiny_saved.config.compile, tmp_path).report.from_cache
    assert not list((tmp_path / "circuits").glob(".tmp-*"))


def test_compile_refuses_no_rounding():
    with pytest.raises(ValueError, match="rounding_threshold_bits"):
        CompileConfig(rounding_threshold_bits=0)


def test_two_sessions_share_a_server_concurrently(predictor, test_split):
    """Two clients (own keys) on one shared server, in threads as Streamlit runs sessions."""
    import threading

    from engine.study.infer import Predictor

    imgs = test_split.images[:3]
    expected = predictor.run(imgs, "simulate")["simulate"].predictions
    server = predictor.ensure_server()
    out, errors = {}, []

    def session(k):
        try:
            p = Predictor(saved=predictor.saved, compiled=predictor.compiled, server=server,
                          client=FHEClient(predictor.compiled))
            out[k] = (p.run(imgs, "quantized,fhe"), p.client.evaluation_keys())
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=session, args=(k,)) for k in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    for res, _ in out.values():
        assert np.array_equal(res["fhe"].predictions, expected)
    assert out[0][1] != out[1][1]  # each session has its own key pair


def test_batched_circuit_shares_keys_and_computes_the_same(predictor, tiny_saved, cache_dir, test_split):
    """A circuit for 4 images per call: the 1-image circuit's integers, and the 1-image client's keys."""
    import dataclasses

    single = predictor.compiled
    cc = dataclasses.replace(predictor.compile_config or tiny_saved.config.compile, batch_size=4)
    batched = compile_model(tiny_saved, cc, cache_dir)
    assert batched.path != single.path and batched.report.input_shape == [4, single.report.input_shape[1]]
    assert (batched.batch_size, single.batch_size) == (4, 1)
    assert batched.report.pbs_count == 4 * single.report.pbs_count

    client = predictor.ensure_client()
    shared = FHEClient(batched)
    shared.share_keys(client)  # no key generation of its own
    assert shared.batch_size == 4 and shared.keygen_s == 0.0
    server = FHEServer(batched.deployment_dir)
    key_id = server.register(client.evaluation_keys())  # what the 1-image client uploads
    feats = predictor.features(test_split.images[:7])
    logits = np.concatenate([shared.decrypt(server.run(shared.encrypt(feats[i : i + 4]), key_id))[: len(feats[i : i + 4])]
                             for i in (0, 4)])  # 4 images, then 3 padded to 4
    assert logits.shape == (7, 2)
    assert np.allclose(logits, single.run_clear(feats))  # exact rounding: the same integers
    with pytest.raises(ValueError, match="5 images"):
        shared.encrypt(feats[:5])

    other = compile_model(tiny_saved, CompileConfig(rounding_threshold_bits=5, p_error=0.05, inputset_size=128), cache_dir)
    with pytest.raises(ValueError, match="different keys"):
        FHEClient(other).share_keys(client)


def test_batch_size_must_fit_the_inputset():
    with pytest.raises(ValueError, match="batch_size"):
        CompileConfig(batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        CompileConfig(batch_size=600, inputset_size=512)


def test_run_threads_are_set_per_thread_and_runs_agree(predictor, test_split):
    """Concrete's OpenMP setting is per thread: a worker limited to one core does not limit
    another thread, and a run on one core computes what a run on every core does."""
    from concurrent.futures import ThreadPoolExecutor

    from engine.fhe.threads import set_run_threads

    client = predictor.ensure_client()
    client.keygen()
    server = FHEServer(predictor.compiled.deployment_dir)
    key_id = server.register(client.evaluation_keys())
    ct = client.encrypt(predictor.features(test_split.images[:1]))

    def run_with(n: int):
        return set_run_threads(n), client.decrypt(server.run(ct, key_id), 1)

    with ThreadPoolExecutor(1) as one, ThreadPoolExecutor(1) as other:
        (n1, y1), (n2, y2) = one.submit(run_with, 1).result(), other.submit(run_with, 2).result()
        assert one.submit(lambda: set_run_threads(1)).result() == 1
    assert (n1, n2) == (1, 2)
    assert np.array_equal(y1, y2)



def test_concurrent_runs_on_one_server_each_get_their_own_result(predictor, test_split):
    """Two clients (own keys, own images) running at once on one server each get exactly the
    result a lone run gives them. A Concrete ServerCircuit passes arguments and results through
    buffers it owns: shared between threads, runs swapped inputs and outputs (25 of 120 results
    wrong with the shipped circuit) and crashed the service ("double free or corruption")."""
    import threading

    from engine.fhe.threads import set_run_threads

    server = FHEServer(predictor.compiled.deployment_dir)
    feats = predictor.features(test_split.images[:2])
    work = []
    for k in range(2):
        client = FHEClient(predictor.compiled)
        client.keygen()
        keys = FHEServer.load_keys(client.evaluation_keys())
        cts = [client.encrypt(feats[(i + k) % 2][None]) for i in range(2)]
        work.append((keys, cts, [server.execute(ct, keys) for ct in cts]))  # alone, one at a time
    start, wrong, runs = threading.Barrier(2), [0, 0], [0, 0]

    def hammer(k):
        set_run_threads(1)
        keys, cts, alone = work[k]
        start.wait(timeout=60)
        for r in range(8):
            i = r % len(cts)
            wrong[k] += server.execute(cts[i], keys) != alone[i]
            runs[k] += 1

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(2)]
    [t.start() for t in threads]
    [t.join(timeout=300) for t in threads]
    assert runs == [8, 8] and wrong == [0, 0]
