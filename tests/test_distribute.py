"""Batches over processes (joblib/loky) and a Dask LocalCluster give the same results."""

import numpy as np
import pytest

from engine.serve.distribute import run_batch


@pytest.fixture(scope="module")
def four(predictor, test_split):
    return predictor.features(test_split.images[:4])


@pytest.fixture(scope="module")
def server_zip(predictor):
    return predictor.compiled.deployment_dir / "server.zip"


def test_local_processes_match_in_process_server(predictor, four, server_zip):
    client = predictor.ensure_client()
    key_id = predictor.ensure_server().register(client.evaluation_keys())
    reference = np.concatenate([client.decrypt(predictor.server.run(client.encrypt(four[i : i + 1]), key_id))
                                for i in range(4)])
    b = run_batch(client, server_zip, four, "local", n_jobs=2)
    assert b.n_workers == 2 and len(b.server_s) == 4 and (b.server_s > 0).all() and b.wall_s >= b.server_wall_s > 0
    assert b.sizes["images_per_call"] == 1 and len(b.encrypt_s) == len(b.decrypt_s) == 4
    assert np.array_equal(b.logits, reference)  # exact rounding: identical results in every process


def test_dask_local_cluster_equals_local_run(predictor, four, server_zip, monkeypatch):
    from dask.distributed import LocalCluster

    from conftest import REPO

    monkeypatch.setenv("PYTHONPATH", str(REPO))
    client = predictor.ensure_client()
    local = run_batch(client, server_zip, four, "local", n_jobs=2)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        remote = run_batch(client, server_zip, four, "dask", scheduler=cluster.scheduler_address)
    assert remote.n_workers == 2 and len(remote.server_s) == 4
    assert np.array_equal(remote.logits, local.logits)


def test_dask_needs_a_scheduler(predictor, four, server_zip):
    with pytest.raises(ValueError, match="--scheduler"):
        run_batch(predictor.ensure_client(), server_zip, four, "dask")


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
