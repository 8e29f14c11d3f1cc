"""Batches over processes (joblib/loky) and a Dask LocalCluster give the same results."""

import numpy as np
import pytest

from engine.distribute import encrypt_batch, serve_batch


@pytest.fixture(scope="module")
def batch(predictor, test_split):
    client = predictor.ensure_client()
    cts, _ = encrypt_batch(client, predictor.features(test_split.images[:4]))
    return client, cts


def decrypt_all(client, results):
    return np.concatenate([client.decrypt(r) for r in results])


def test_local_processes_match_in_process_server(predictor, batch):
    client, cts = batch
    key_id = predictor.ensure_server().register(client.evaluation_keys())
    reference = decrypt_all(client, [predictor.server.run(ct, key_id) for ct in cts])
    results, server_s, wall, workers = serve_batch(predictor.compiled.deployment_dir / "server.zip",
                                                   client.evaluation_keys(), cts, "local", n_jobs=2)
    assert workers == 2 and len(server_s) == 4 and (server_s > 0).all() and wall > 0
    assert np.array_equal(decrypt_all(client, results), reference)


def test_dask_local_cluster_equals_local_run(predictor, batch, monkeypatch):
    from dask.distributed import LocalCluster

    from conftest import REPO

    monkeypatch.setenv("PYTHONPATH", str(REPO))
    client, cts = batch
    zip_path = predictor.compiled.deployment_dir / "server.zip"
    local, *_ = serve_batch(zip_path, client.evaluation_keys(), cts, "local", n_jobs=2)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        remote, server_s, _, workers = serve_batch(zip_path, client.evaluation_keys(), cts, "dask",
                                                   scheduler=cluster.scheduler_address)
    assert workers == 2 and len(server_s) == 4
    assert np.array_equal(decrypt_all(client, remote), decrypt_all(client, local))


def test_dask_needs_a_scheduler(predictor, batch):
    client, cts = batch
    with pytest.raises(ValueError, match="--scheduler"):
        serve_batch(predictor.compiled.deployment_dir / "server.zip", client.evaluation_keys(), cts, "dask")


def test_batches_of_several_images_per_call(predictor, test_split):
    """5 images, 2 per call (the last call padded), over 2 warm worker processes: the predictions
    of one image per call, with one key set."""
    images = test_split.images[:5]
    one, _ = predictor.run_distributed(images, "local", n_jobs=2)
    res, b = predictor.run_distributed(images, "local", n_jobs=2, batch_size=2, warm=True)
    assert b.sizes["images_per_call"] == 2 and len(b.server_s) == 5 and b.n_workers == 2
    assert b.sizes["ciphertext_bytes"] > one.sizes["ciphertext_bytes"]
    assert np.allclose(res.logits, one.logits)  # exact rounding: identical results
    assert np.array_equal(res.predictions, one.predictions)
