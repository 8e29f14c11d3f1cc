"""The command line as a user drives it (subprocesses, real data, real circuits)."""

import re
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, wait_healthy


@pytest.fixture(scope="module")
def env(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("cli")
    return {**os.environ, "MEDMNIST_DIR": str(data_dir), "ENGINE_MODELS_DIR": str(root / "models"),
            "ENGINE_CACHE_DIR": str(root / "cache")}


def run(env, *args, ok=True):
    p = subprocess.run([sys.executable, "-m", "engine", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert p.returncode == 0, p.stderr[-2000:]
    return p


def test_train_compile_predict_evaluate(env, tmp_path):
    out = run(env, "train", "--dataset", "pneumoniamnist", "--epochs", "2", "--hidden", "8", "--limit-train", "1024",
              "--input-pool", "1", "--weight-bits", "3", "--act-bits", "3", "--input-bits", "3", "--augment", "0",
              "--rotate", "0", "--scale", "0",
              "--rounding-bits", "4", "--rounding-method", "exact", "--p-error", "1e-5", "--name", "cli-tiny").stdout
    assert "saved pneumoniamnist/cli-tiny" in out and "test accuracy" in out
    assert re.search(r"input check fitted: (9[5-9]|100)\.\d% of validation images pass", out)
    # training ends with the circuit: compiled, its stability checked, its latency measured
    assert " PBS" in out and "freshly compiled" in out
    assert re.search(r"stability: repeated simulations agree on \d+\.\d\d% of 300 validation images", out)
    assert re.search(r"expected encrypted latency: \d+ ms per image", out)
    first = run(env, "compile", "--dataset", "pneumoniamnist", "--stability-images", "60").stdout
    assert " PBS" in first and "from cache" in first
    assert re.search(r"stability: repeated simulations agree on \d+\.\d\d% of 60 validation images", first)
    second = run(env, "compile", "--dataset", "pneumoniamnist", "--keygen").stdout
    assert "from cache" in second and "keygen" in second
    pred = tmp_path / "pred.json"
    out = run(env, "predict", "--dataset", "pneumoniamnist", "--split", "test", "--index", "0", "7", "--modes", "all",
              "--json", str(pred)).stdout
    assert out.count("test[") == 2 and "fhe sizes" in out
    rows = json.loads(pred.read_text())
    assert [r["image"] for r in rows] == ["test[0]", "test[7]"]
    assert all(r["simulate"]["label"] == r["fhe"]["label"] for r in rows)
    report_path = tmp_path / "out.json"
    out = run(env, "evaluate", "--dataset", "pneumoniamnist", "--modes", "float,quantized,simulate,fhe", "--limit", "6",
              "--json", str(report_path)).stdout
    rep = json.loads(report_path.read_text())
    assert rep["dataset"] == "pneumoniamnist" and rep["model"] == "cli-tiny" and rep["n"] == 6
    assert set(rep["modes"]) == {"float", "quantized", "simulate", "fhe"}
    for m in rep["modes"].values():
        assert {"accuracy", "auc", "latency_median_s", "latency_p90_s"} <= set(m)
    assert rep["agreement_simulate_fhe"] == 1.0
    c = rep["circuit"]
    assert c["pbs_count"] > 8 and c["from_cache"] and c["keygen_s"] > 0 and c["eval_key_bytes"] > 0
    assert c["compile"] == {"rounding_threshold_bits": 4, "rounding_method": "exact", "p_error": 1e-5, "inputset_size": 512,
                           "batch_size": 1}
    assert "fhe stages" in out


def test_train_defaults_come_from_the_search_or_a_generic_recipe(env):
    pneu = json.loads(run(env, "train", "--dataset", "pneumoniamnist", "--show-recipe").stdout)
    chosen = json.loads((REPO / "engine" / "learn" / "searched" / "pneumoniamnist.json").read_text())["config"]
    stage = {"input_levels": 0, "features": "pixels", "scattering_j": 2, "scattering_l": 8, "feature_grid": 2}
    assert pneu["model"] == {**stage, **chosen["model"]} and pneu["train"]["epochs"] == chosen["train"]["epochs"]
    assert pneu["compile"] == {"batch_size": 1, **chosen["compile"]} and pneu["train"]["distill"] == chosen["train"].get("distill", 0.0)
    other = run(env, "train", "--dataset", "pathmnist", "--show-recipe", "--epochs", "3")
    rec = json.loads(other.stdout)
    assert "generic recipe" in other.stderr and rec["train"]["epochs"] == 3
    assert rec["model"]["input_pool"] >= 2 and rec["model"]["weight_bits"] <= 3
    # 16 inputs of 2 bits per neuron: 6-bit accumulators; cheap lookups
    assert (rec["model"]["max_active_inputs"], rec["model"]["input_bits"]) == (16, 2) and rec["compile"]["p_error"] == 0.01
    assert rec["train"]["seeds"] == 3 and rec["train"]["prune_epochs"] == 10 and rec["model"]["input_levels"] == 7
    assert "why (the generic recipe)" in other.stderr and "  seeds: 3 runs" in other.stderr


def test_every_field_of_a_recipe_survives_train_and_a_broken_one_is_an_error(env, tmp_path):
    """A recipe whose fields are off their defaults (conftest.unusual_recipe): ``train`` starts from
    all of them, the flags given replace only their own fields; a broken recipe file is a clear
    error (exit 2), never a silent fallback to the generic recipe."""
    from conftest import unusual_recipe

    recipe = unusual_recipe(tmp_path / "recipes")
    env = {**env, "ENGINE_RECIPES_DIR": str(tmp_path / "recipes")}
    shown = json.loads(run(env, "train", "--dataset", "pneumoniamnist", "--show-recipe").stdout)
    assert shown["model"] == recipe["model"] and shown["train"] == recipe["train"] and shown["compile"] == recipe["compile"]
    shown = json.loads(run(env, "train", "--dataset", "pneumoniamnist", "--show-recipe", "--lr", "0.01",
                           "--p-error", "0.05", "--hidden", "6", "6").stdout)
    assert shown["train"] == {**recipe["train"], "lr": 0.01} and shown["model"] == {**recipe["model"], "hidden": [6, 6]}
    assert shown["compile"] == {**recipe["compile"], "p_error": 0.05}
    (tmp_path / "recipes" / "pneumoniamnist.json").write_text('{"config": {"model": {"hiden": [4]}}}')
    broken = run(env, "train", "--dataset", "pneumoniamnist", "--show-recipe", ok=False)
    assert broken.returncode == 2 and "pneumoniamnist.json is broken" in broken.stderr, broken.stderr[-500:]


def test_predict_image_warns_about_foreign_inputs(env, tmp_path, data_dir):
    import numpy as np
    from PIL import Image

    from engine.learn.data import DataConfig, load_split

    val = load_split(DataConfig("pneumoniamnist", data_dir=str(data_dir), allow_download=False), "val")
    Image.fromarray(val.images[0]).save(tmp_path / "xray.png")
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(tmp_path / "black.png")
    Image.fromarray(np.zeros((10, 2000), np.uint8)).save(tmp_path / "strip.png")
    np.save(tmp_path / "noise.npy", np.random.default_rng(0).random((64, 64)))
    files = [str(tmp_path / f) for f in ("xray.png", "black.png", "strip.png", "noise.npy")]
    out = run(env, "predict", "--dataset", "pneumoniamnist", "--model", "cli-tiny", "--modes", "quantized",
              "--image", *files).stdout
    warned = {line.split()[1] for line in out.splitlines() if line.startswith("warning:")}
    assert warned == set(files[1:]), out
    assert all(f"{f}: " in out for f in files) and "confidence" in out


def test_evaluate_images_on_a_labelled_folder(env, tmp_path, data_dir):
    """Validation on one's own labelled images: class folders named as the user likes (mapped),
    an unreadable file listed and counted, encryption in the last mode; a folder that matches no
    label is one clear error naming it."""
    import numpy as np
    from PIL import Image

    from engine.learn.data import DataConfig, load_split

    val = load_split(DataConfig("pneumoniamnist", data_dir=str(data_dir), allow_download=False), "val")
    root = tmp_path / "mine"
    picks = {"Healthy": np.flatnonzero(val.labels[:, 0] == 0)[:3], "PNEUMONIA": np.flatnonzero(val.labels[:, 0] == 1)[:3]}
    for folder, idx in picks.items():
        (root / folder).mkdir(parents=True)
        for i in idx:  # uploads as a clinic has them: larger, JPEG
            Image.fromarray(val.images[i]).resize((112, 112)).save(root / folder / f"img{i}.jpg", quality=90)
    (root / "PNEUMONIA" / "broken.png").write_bytes(b"not a png")
    report = tmp_path / "mine.json"
    out = run(env, "evaluate", "--dataset", "pneumoniamnist", "--model", "cli-tiny", "--images", str(root),
              "--label-map", "healthy=0", "--modes", "quantized,fhe", "--json", str(report)).stdout
    rep = json.loads(report.read_text())
    assert rep["files"] == 7 and rep["n"] == 6
    assert rep["unreadable"] == [{"file": "PNEUMONIA/broken.png", "reason": rep["unreadable"][0]["reason"]}]
    assert "not an image" in rep["unreadable"][0]["reason"] and "unreadable: PNEUMONIA/broken.png" in out
    assert set(rep["modes"]) == {"quantized", "fhe"} and rep["answer_mode"] == "fhe"
    fhe = rep["modes"]["fhe"]
    assert sum(map(sum, fhe["confusion"])) == 6 and [sum(r) for r in fhe["confusion"]] == [3, 3]
    assert set(fhe["recall"]) == {"normal", "pneumonia"}
    images = rep["images"]
    assert sorted(i["file"] for i in images) == sorted(f"{f}/img{i}.jpg" for f, idx in picks.items() for i in idx)
    for im in images:
        assert im["label"] == (0 if im["file"].startswith("Healthy/") else 1)
        assert isinstance(im["prediction"], int) and 0.5 <= im["confidence"] <= 1 and isinstance(im["flagged"], bool)
    right = np.mean([im["prediction"] == im["label"] for im in images])
    assert abs(fhe["accuracy"] - right) < 1e-9
    assert "confusion matrix (fhe" in out and "flagged as unlike the training images" in out
    # a folder matching no label: one clear error that names it
    (root / "Unsure").mkdir()
    Image.fromarray(val.images[0]).save(root / "Unsure" / "x.png")
    p = run(env, "evaluate", "--dataset", "pneumoniamnist", "--model", "cli-tiny", "--images", str(root),
            "--label-map", "healthy=0", "--modes", "quantized", ok=False)
    assert p.returncode == 2 and "Folder 'Unsure'" in p.stderr and "Traceback" not in p.stderr


def test_an_operating_point_chosen_on_one_folder_and_applied_to_another(env, tmp_path, data_dir):
    """evaluate --images reports the ROC with bootstrap intervals; --target-recall --save-point
    chooses and saves a point; --point applies it to a second folder of the same kind (its recall
    stays in the first folder's interval, the figures are those of its decisions, the refer band
    is counted apart) and to predict; a point made for another model is refused (exit 2)."""
    import numpy as np
    from PIL import Image

    from engine.learn.data import DataConfig, load_split

    val = load_split(DataConfig("pneumoniamnist", data_dir=str(data_dir), allow_download=False), "val")
    normal, pneumonia = (np.flatnonzero(val.labels[:, 0] == c) for c in (0, 1))
    folders = {}
    for name, part in (("first", slice(0, 40)), ("second", slice(40, 80))):
        root = folders[name] = tmp_path / name
        for cls, idx in (("NORMAL", normal[part]), ("PNEUMONIA", pneumonia[part])):
            (root / cls).mkdir(parents=True)
            for i in idx:
                Image.fromarray(val.images[i]).save(root / cls / f"v{i}.png")
    point, first = tmp_path / "point.json", tmp_path / "first.json"
    out = run(env, "evaluate", "--dataset", "pneumoniamnist", "--model", "cli-tiny", "--images", str(folders["first"]),
              "--modes", "quantized", "--target-recall", "0.95", "--refer-band", "0.45,0.5", "--save-point", str(point),
              "--json", str(first)).stdout
    rep = json.loads(first.read_text())
    op = rep["operating"]
    assert op["n"] == 80 and op["positives"] == 40 and op["finding"] == 1
    assert op["auc_ci"][0] <= op["auc"] <= op["auc_ci"][1] and op["auc"] > 0.8
    assert [r["threshold"] for r in op["table"]][:2] == [0.05, 0.1]
    assert all(r["sensitivity_ci"][0] <= r["sensitivity"] <= r["sensitivity_ci"][1] for r in op["table"])
    assert "ROC of pneumonia on 80 images" in out and "answers: argmax (no operating point)" in out
    # without a point the answers are argmax: no decision of another kind
    assert all("decision" not in im for im in rep["images"]) and rep["decided_by"].startswith("argmax")
    saved = json.loads(point.read_text())
    chosen = saved["figures"]
    assert chosen["sensitivity"] >= 0.95 and saved["chosen_by"] == "recall >= 0.95" and saved["refer"] == [0.45, 0.5]
    assert saved["images"]["n"] == 80 and len(saved["images"]["content_hash"]) == 64
    second = tmp_path / "second.json"
    out = run(env, "evaluate", "--dataset", "pneumoniamnist", "--model", "cli-tiny", "--images", str(folders["second"]),
              "--modes", "quantized", "--point", str(point), "--json", str(second)).stdout
    rep2 = json.loads(second.read_text())
    at = rep2["at_point"]
    images = rep2["images"]
    referred = [im for im in images if 0.45 <= im["finding_probability"] < 0.5]
    assert at["referred"] == len(referred) and all(im["decision"] == "refer to a radiologist" for im in referred)
    answered = [im for im in images if im not in referred]
    found = [im["decision"] == "pneumonia" for im in answered if im["label"] == 1]
    cleared = [im["decision"] == "normal" for im in answered if im["label"] == 0]
    assert at["sensitivity"] == pytest.approx(np.mean(found)) and at["specificity"] == pytest.approx(np.mean(cleared))
    assert chosen["sensitivity_ci"][0] <= at["sensitivity"] <= 1.0
    assert "at the operating point: sensitivity" in out and "referred" in out
    # the point changes the decisions only, never the figures per mode
    assert rep2["modes"]["quantized"]["accuracy"] == pytest.approx(np.mean([im["prediction"] == im["label"] for im in images]))
    img = next((folders["second"] / "PNEUMONIA").glob("*.png"))
    pred = tmp_path / "pred.json"
    out = run(env, "predict", "--dataset", "pneumoniamnist", "--model", "cli-tiny", "--image", str(img), "--modes",
              "quantized", "--point", str(point), "--json", str(pred)).stdout
    row = json.loads(pred.read_text())[0]
    assert "answers: operating point: pneumonia when P(pneumonia) >=" in out and "decided: " in out
    assert row["threshold"] == saved["threshold"] and row["decision"] in ("pneumonia", "normal", "refer to a radiologist")
    # a point made for another model: refused with a clear error
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**saved, "model_hash": "0" * 64}))
    p = run(env, "predict", "--dataset", "pneumoniamnist", "--model", "cli-tiny", "--index", "0", "--modes", "quantized",
            "--point", str(other), ok=False)
    assert p.returncode == 2 and "this operating point was chosen for" in p.stderr and "Traceback" not in p.stderr


def test_train_then_evaluate_any_subset(env, tmp_path):
    from conftest import make_npz

    make_npz(tmp_path, "dermamnist", n=48)
    e = {**env, "MEDMNIST_DIR": str(tmp_path)}
    out = run(e, "train", "--dataset", "dermamnist", "--epochs", "1", "--hidden", "4").stdout
    # the generic recipe's pruning keeps an RGB subset's accumulators at 6 bits (8 unpruned)
    assert int(re.search(r"max bit-width (\d+)", out).group(1)) <= 6
    assert "stability: repeated simulations agree" in out and "expected encrypted latency" in out
    out = run(e, "evaluate", "--dataset", "dermamnist", "--modes", "float,quantized", "--limit", "10").stdout
    assert "dermamnist" in out and "quantized" in out


USER_ERRORS = [
    (["predict", "--dataset", "nosuchmnist"], "Unknown dataset 'nosuchmnist'"),
    (["predict", "--dataset", "pneumoniamnist", "--modes", "float,gpu"], "Unknown mode(s) gpu"),
    (["predict", "--dataset", "pneumoniamnist", "--index", "100000"], "out of range"),
    (["evaluate", "--dataset", "breastmnist"], "No trained model for 'breastmnist'"),
    (["train", "--dataset", "breastmnist", "--data-dir", "/nonexistent", "--no-download"], "breastmnist.npz not found"),
    (["train", "--dataset", "breastmnist", "--rounding-bits", "0"], "rounding_threshold_bits"),
]

# Every command line in one child process (the CLI's own main, as `python -m engine` calls it):
# one import of the engine instead of six.
_ERRORS_CHILD = """
import contextlib, io, json, sys
from engine.cli import main
out = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(args)
    out.append([code, err.getvalue()])
print(json.dumps(out))
"""


def test_user_errors_are_one_line(env):
    p = subprocess.run([sys.executable, "-c", _ERRORS_CHILD, json.dumps([a for a, _ in USER_ERRORS])], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]  # no command raised
    for (args, needle), (code, stderr) in zip(USER_ERRORS, json.loads(p.stdout.splitlines()[-1]), strict=True):
        assert code == 2, args
        err = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and needle in err[0], (args, stderr[-1500:])


def test_bench_writes_json_and_markdown(env, tmp_path):
    """The benchmark on a few images (the full-split figures come from the same command)."""
    out = tmp_path / "results"
    p = run(env, "bench", "--dataset", "pneumoniamnist", "--model", "cli-tiny", "--limit", "6",
            "--throughput-images", "4", "--batch-size", "2", "--defaults-cap", "20", "--defaults-images", "1", "--repeats", "1", "--out", str(out))
    rep = json.loads((out / "pneumoniamnist.json").read_text())
    for key in ("fhe_e2e_latency_median_s", "fhe_server_latency_median_s", "throughput_img_per_s",
                "defaults_latency_ratio", "defaults_keygen_ratio", "agreement_simulate_fhe", "eval_key_bytes"):
        assert rep[key] is not None, key
    assert set(rep["modes"]) == {"float", "quantized", "simulate", "fhe"} and rep["n"] == 6
    assert rep["fhe_server_latency_median_s"] < rep["fhe_e2e_latency_median_s"]
    assert rep["throughput"]["agrees_with_sequential"] and rep["throughput"]["workers"] == 2  # exact rounding
    batch = rep["batch_throughput"]
    assert (batch["images_per_call"], batch["images"], batch["workers"]) == (2, 4, 2)
    assert batch["batched_agrees_with_sequential"] == batch["single_agrees_with_sequential"] == 1.0
    assert batch["gain_over_single"] == pytest.approx(batch["batched_img_per_s"] / batch["single_img_per_s"])
    assert rep["machine"]["cores"] >= 1 and rep["machine"]["cpu"]
    assert rep["defaults"]["cap_s"] == 20
    first = rep["first_request"]
    assert first["fresh_key_s"] > 0 and first["later_median_s"] > 0
    fresh = first["fresh_process"]
    assert 0 < fresh["first_request_s"] and 0 < fresh["second_request_s"] and fresh["keygen_s"] > 0
    assert fresh["start_to_first_answer_s"] > fresh["keygen_s"] + fresh["first_request_s"]
    if not rep["defaults"]["finished"]:
        assert rep["defaults_latency_ratio_is_lower_bound"]
    targets = {row["target"]: row for row in rep["targets"]}
    throughput = next(row for name, row in targets.items() if name.startswith("throughput >="))
    assert throughput["measured"].startswith(f"{batch['batched_img_per_s']:.2f} img/s")  # a batch as one request
    assert "2 images per call" in (out / "pneumoniamnist.md").read_text()
    agree = next(row for name, row in targets.items() if name.startswith("simulate/encrypted agreement"))
    assert agree["met"] == (rep["agreement_simulate_fhe"] >= 0.995)
    assert any(name.startswith("encrypted accuracy >= 88%") for name in targets)
    md = (out / "pneumoniamnist.md").read_text()
    assert "first request of a fresh key" in md and "fresh process: first / second request" in md
    assert "| fhe |" in md and "throughput" in md and "Concrete ML defaults" in md and "| target | measured | met |" in md
    assert "| fhe |" in p.stdout


def test_search_scores_points_and_chooses_a_stable_one(env, tmp_path):
    out = run(env, "search", "--dataset", "pneumoniamnist", "--hidden", "8", "--weight-bits", "2", "--act-bits", "2", "3",
              "--input-bits", "2", "--pools", "2", "--rounding", "4", "--p-error", "1e-5", "--epochs", "1",
              "--augment", "0", "--n-fhe", "1", "--out", str(tmp_path)).stdout
    # Either point may win (the rule weighs measured latency); the label names one of the two.
    assert re.search(r"chosen \(validation only\): h8 (b2|w2a3i2) pool2", out) and "--act-bits" in out
    report = json.loads((tmp_path / "pneumoniamnist_search.json").read_text())
    points = report["points"]
    assert sorted(p["act_bits"] for p in points) == [2, 3]
    for p in points:
        assert 0.5 <= p["simulate_balanced_accuracy"] <= 1 and 0.9 <= p["simulate_agreement"] <= 1
        assert p["fhe_latency_median_s"] > 0 and p["pbs_count"] == 8
    assert (tmp_path / "pneumoniamnist_pareto.html").stat().st_size > 1000


def test_serve_then_predict_and_loadtest_over_http(env, tmp_path):
    """`engine serve` in its own process; `predict --server` and `loadtest` as its clients."""

    # with intensity levels: the remote client (predict --server, loadtest) sends them too
    trained = run(env, "train", "--dataset", "pneumoniamnist", "--epochs", "1", "--hidden", "8", "--limit-train", "512",
                  "--input-levels", "3", "--seeds", "2", "--rounding-bits", "4", "--rounding-method", "exact",
                  "--p-error", "1e-5", "--name", "cli-served", "--overwrite").stdout
    assert re.search(r"kept seed [01] of 2: validation accuracy [\d.]+% \(\d+ bits\), [\d.]+% \(\d+ bits\) \(spread",
                     trained)
    from engine.serve.ports import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--port", str(port), "--key-store-bytes", "2GiB"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, tmp_path / "serve.log", "the service")
        pred = tmp_path / "pred.json"
        out = run(env, "predict", "--dataset", "pneumoniamnist", "--model", "cli-served", "--index", "0", "3",
                  "--modes", "simulate,fhe", "--server", url, "--json", str(pred)).stdout
        rows = json.loads(pred.read_text())
        assert all(r["simulate"]["label"] == r["fhe"]["label"] for r in rows)
        assert all(r["fhe"]["server_s"] > 0 and "network_s" in r["fhe"] for r in rows)
        lt = tmp_path / "lt.json"
        out = run(env, "loadtest", "--server", url, "--clients", "2", "--requests", "2", "--model", "cli-served",
                  "--json", str(lt)).stdout
        r = json.loads(lt.read_text())
        assert r["clients"] == 2 and r["requests"] == 2 and r["completed"] == 4 and r["errors"] == 0
        assert r["latency_p50_s"] > 0 and r["throughput_rps"] > 0 and r["server_rss_peak_bytes"] > 100 * 2**20
        assert "4 answered, 0 errors" in out
        assert r["answers_rechecked"] == 2 and r["answers_differing"] == 0 and "0 of 2 differ" in out
        bad = run(env, "predict", "--dataset", "pneumoniamnist", "--model", "cli-served", "--modes", "fhe",
                  "--server", "http://127.0.0.1:1", ok=False)
        assert bad.returncode == 2 and "cannot reach" in bad.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)
