"""Every dashboard page through streamlit.testing.v1.AppTest, on the tiny real model."""

import json
import re

import pytest
from streamlit.testing.v1 import AppTest

from conftest import REPO

TIMEOUT = 300


@pytest.fixture(scope="module")
def service_url(tiny_saved, models_dir, cache_dir, tmp_path_factory):
    """One service for every AppTest here (AppTest runs do not share Streamlit's resource cache,
    so an app-started service per test would pile up); the app starting its own service is
    covered by the browser test."""
    from engine.serve.process import LocalServiceProcess

    proc = LocalServiceProcess(models_dir, cache_dir, key_store_bytes=3 * 2**30,
                               log=tmp_path_factory.mktemp("service") / "service.log")
    yield proc.url
    proc.stop()


@pytest.fixture
def app_env(monkeypatch, tiny_saved, models_dir, cache_dir, data_dir, tmp_path, service_url):
    monkeypatch.setenv("ENGINE_SERVER_URL", service_url)
    monkeypatch.setenv("ENGINE_KEY_SPARES", "1")
    monkeypatch.setenv("ENGINE_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("MEDMNIST_DIR", str(data_dir))
    monkeypatch.setenv("ENGINE_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.chdir(REPO)
    return tmp_path


def page(path: str) -> AppTest:
    at = AppTest.from_file(str(REPO / path), default_timeout=TIMEOUT)
    at.session_state["model"] = ("pneumoniamnist", "tiny")
    return at.run()


def ok(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def test_home_encrypted_prediction(app_env):
    at = ok(page("app.py"))
    assert "Encrypted medical image classification" in at.title[0].value
    at.button(key="home_run").click().run()
    ok(at)
    assert any("Encrypted prediction:" in s.value for s in at.success)
    table = markdown_rows(next(m.value for m in at.markdown
                               if m.value.startswith("|") and m.value.split("|")[1].strip() == "mode"))
    assert [r["mode"] for r in table] == ["Encrypted (FHE)"] and float(table[0]["server (ms)"]) > 0
    assert "network (ms)" in table[0] and "queue (ms)" in table[0]
    status = next(m.value for m in at.markdown if "**This session's keys**" in m.value)
    assert app_env_url(at) in status
    # The first answers come with this session's own keys when they are ready, else with the app's
    # shared key set; the page says which, and the status row agrees.
    note = next(c.value for c in at.caption if c.value.startswith("Encrypted and decrypted with"))
    if note.startswith("Encrypted and decrypted with this session's own keys"):
        assert "**This session's keys** generated" in status
    else:
        # the status row is redrawn at the end of the run with the keys' state then (dashboard/views/0_Home.py):
        # this session's keys may have arrived after the shared set answered
        assert "shared key set" in note and ("the app's shared key set answers" in status
                                             or "**This session's keys** generated" in status)
    wire = next(m.value for m in at.markdown if "What crossed the wire" in m.value)
    assert f"(to {app_env_url(at)})" in wire and "bytes of ciphertext" in wire
    hexes = next(m.value for m in at.markdown if m.value.startswith("ciphertext `"))
    assert all(re.fullmatch(r"(?:[0-9a-f]{2} ){24}…", part.split("`")[1]) for part in hexes.split("\n"))  # 24 bytes each
    at.button(key="home_wrong_key").click().run()
    ok(at)
    assert any("freshly generated wrong key" in m.value for m in at.markdown)
    right, wrong = [json.loads(j.value) for j in at.json][-2:]
    assert right["logits"] != wrong["logits"]
    # without an operating point the answer is argmax and says so; with one, it names the point
    # and the class decided there (a threshold of 0: every image is called pneumonia)
    assert any(m.value == "Decided by argmax (no operating point chosen)." for m in at.markdown)
    from engine.learn import registry
    from engine.study.operating import OperatingPoint

    tiny = registry.load("pneumoniamnist", "tiny")
    at.session_state["operating_points"] = {tiny.hash: OperatingPoint(
        dataset="pneumoniamnist", model="tiny", model_hash=tiny.hash, finding=1, finding_name="pneumonia",
        other_name="normal", threshold=0.0, chosen_by="a test")}
    at.button(key="home_run").click().run()
    ok(at)
    decided = next(m.value for m in at.markdown if m.value.startswith("Decided at the operating point"))
    assert "pneumonia when P(pneumonia) >= 0.000 (a test)" in decided and ": **pneumonia (P(pneumonia)" in decided


def markdown_rows(text: str) -> list[dict]:
    """The rows of a Markdown table, as dicts keyed by its header."""
    lines = [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in text.splitlines()]
    return [dict(zip(lines[0], row)) for row in lines[2:]]


def app_env_url(at) -> str:
    import os

    return os.environ["ENGINE_SERVER_URL"]


def test_read_only_demo_offers_inference_only(app_env, monkeypatch):
    monkeypatch.setenv("ENGINE_READ_ONLY", "1")
    at = ok(page("dashboard/views/1_Train.py"))
    assert any("training is disabled" in i.value for i in at.info) and not at.button
    at = ok(page("dashboard/views/5_Bit-width_explorer.py"))
    assert any("new sweeps are disabled" in i.value for i in at.info)


def test_train_page_trains_and_saves(app_env, monkeypatch):
    monkeypatch.setenv("ENGINE_MODELS_DIR", str(app_env / "models"))
    at = AppTest.from_file(str(REPO / "dashboard/views/1_Train.py"), default_timeout=TIMEOUT).run()
    ok(at)
    at.selectbox(key="train_dataset").set_value("pneumoniamnist").run()
    ok(at)  # the form now holds the search's recipe for pneumoniamnist
    assert at.number_input(key="train_epochs").value == 30 and at.selectbox(key="train_pool").value == 3
    assert at.slider(key="train_wbits").value == 2
    at.text_input(key="train_hidden").set_value("4")
    at.number_input(key="train_epochs").set_value(2)
    at.number_input(key="train_limit").set_value(256)
    at.text_input(key="train_name").set_value("from-ui")
    at.number_input(key="train_levels").set_value(2)
    at.number_input(key="train_seeds").set_value(2)
    at.checkbox(key="train_quick").check()
    at.button[0].click().run()
    ok(at)
    assert any("Saved **pneumoniamnist/from-ui**" in s.value for s in at.success)
    tables = {tuple(d.value.columns): d.value for d in at.dataframe}
    searched = tables[("variant", "validation accuracy", "chosen")]
    assert len(searched) == 3 and searched["chosen"].sum() == 1  # the recipe, without levels, a 7x7 grid
    assert any("of 2 runs" in c.value for c in at.caption)
    saved = next(v for k, v in tables.items() if "name" in k)
    assert "from-ui" in list(saved["name"])
    assert at.session_state["model"] == ("pneumoniamnist", "from-ui")
    assert (app_env / "models" / "pneumoniamnist" / "from-ui" / "weights.pt").exists()


def test_train_page_keeps_every_field_of_the_recipe(app_env, monkeypatch):
    """The Train page's form starts from the recipe, and what it saves is the recipe with the form's
    values over it: every field the form does not show survives (conftest.unusual_recipe)."""
    from conftest import unusual_recipe

    from engine.learn import registry

    recipe = unusual_recipe(app_env / "recipes")
    monkeypatch.setenv("ENGINE_RECIPES_DIR", str(app_env / "recipes"))
    monkeypatch.setenv("ENGINE_MODELS_DIR", str(app_env / "models"))
    at = AppTest.from_file(str(REPO / "dashboard/views/1_Train.py"), default_timeout=TIMEOUT).run()
    at.selectbox(key="train_dataset").set_value("pneumoniamnist").run()
    ok(at)
    shown = at.json[0].value
    shown = json.loads(shown) if isinstance(shown, str) else shown
    assert shown["model"] == recipe["model"] and shown["train"] == recipe["train"]
    at.number_input(key="train_limit").set_value(256)
    at.text_input(key="train_name").set_value("recipe-kept")
    at.button[0].click().run()
    ok(at)
    saved = registry.load("pneumoniamnist", "recipe-kept", app_env / "models")
    trained = json.loads(json.dumps(saved.config.to_dict()))
    assert trained["model"] == recipe["model"] and trained["compile"] == recipe["compile"]
    assert trained["train"] == {**recipe["train"], "limit_train": 256}


def test_compile_page_reports_circuit_and_keys(app_env, predictor):
    at = ok(page("dashboard/views/2_Compile.py"))
    at.button(key="compile_btn").click().run()
    ok(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Programmable bootstraps"] == str(predictor.compiled.report.pbs_count)
    assert metrics["Source"] in ("cache", "fresh compile")
    at.button(key="keygen_btn").click().run()
    ok(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Key generation"].endswith(" s") and metrics["Evaluation key size"].endswith("MiB")


def test_inference_page_four_modes(app_env):
    at = ok(page("dashboard/views/3_Encrypted_inference.py"))
    assert len(at.multiselect(key="inf_pick").value) == 2
    at.button(key="inf_run").click().run()
    ok(at)
    df = at.dataframe[0].value
    assert len(df) == 8 and set(df["mode"]) == {"Float (PyTorch)", "Quantized clear", "FHE simulation", "Encrypted (FHE)"}
    sim = df[df["mode"] == "FHE simulation"]["prediction"].tolist()
    enc = df[df["mode"] == "Encrypted (FHE)"]["prediction"].tolist()
    assert sim == enc
    assert any("FHE simulation vs Encrypted (FHE): 100%" in c.value for c in at.caption)
    at.selectbox(key="inf_class").set_value("normal").run()
    ok(at)
    assert all("normal" in str(o) for o in at.multiselect(key="inf_pick").options)


def test_upload_page_renders(app_env):
    at = ok(page("dashboard/views/4_Upload.py"))
    assert "28×28 grayscale" in at.markdown[0].value


def test_bitwidth_explorer_shows_shipped_curves_without_a_dataset_file(app_env, monkeypatch, tmp_path):
    monkeypatch.setenv("MEDMNIST_DIR", str(tmp_path / "empty"))
    at = ok(page("dashboard/views/5_Bit-width_explorer.py"))
    assert at.selectbox(key="ex_dataset").value == "pneumoniamnist"  # the selected model's dataset
    assert any("Shipped sweep" in c.value for c in at.caption)
    charts = at.get("plotly_chart")
    assert len(charts) == 2  # the curves and the search's Pareto front
    curves = json.loads(charts[0].proto.spec)
    assert {t["name"] for t in curves["data"]} >= {"rounding 5", "rounding 6"}
    assert sorted({x for t in curves["data"] for x in t["x"]}) == list(range(2, 9))
    assert "validation accuracy" in curves["layout"]["yaxis"]["title"]["text"]
    pareto = json.loads(charts[1].proto.spec)
    assert any(t["name"].startswith("chosen") for t in pareto["data"])
    assert any("No pneumoniamnist file" in w.value for w in at.warning)  # new sweeps need the data
    at.selectbox(key="ex_metric").set_value("fhe_latency_median_s").run()
    ok(at)
    lat = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert lat["layout"]["yaxis"]["title"]["text"] == "latency per image (ms)"
    at.selectbox(key="ex_dataset").set_value("breastmnist").run()
    ok(at)
    assert any("fcnn-12" in c.value for c in at.caption)


def test_bitwidth_explorer_new_sweep_appears_point_by_point(app_env):
    at = ok(page("dashboard/views/5_Bit-width_explorer.py"))
    at.text_input(key="sw_hidden").set_value("4")
    at.number_input(key="sw_epochs").set_value(1)
    at.number_input(key="sw_limit").set_value(256)
    at.slider(key="sw_bits").set_value((2, 3))
    at.multiselect(key="sw_rounding").set_value([4])
    at.number_input(key="sw_nval").set_value(60)
    at.number_input(key="sw_nfhe").set_value(1)
    at.button[0].click().run()
    ok(at)
    rows = at.session_state["ex_new_rows"]["pneumoniamnist"]
    assert [r["bits"] for r in rows] == [2, 3] and all(0 <= r["simulate_accuracy"] <= 1 for r in rows)
    assert all(r["fhe_latency_median_s"] > 0 and r["evaluation_key_bytes"] > 0 and r["keygen_s"] > 0 for r in rows)
    assert all(r["fhe_accuracy"] in (0.0, 1.0) for r in rows)
    # The sweep follows the selected model's recipe: its exact rounding adds lookups to the 4 neurons'.
    assert all(r["config"]["compile"]["rounding_method"] == "exact" and r["pbs_count"] >= 4 for r in rows)
    assert any("2 points measured" in s.value for s in at.success)
    names = {t["name"] for t in json.loads(at.get("plotly_chart")[0].proto.spec)["data"]}
    assert "rounding 4 (new)" in names


def test_benchmarks_page(app_env):
    at = ok(page("dashboard/views/6_Benchmarks.py"))
    assert any("No stored results" in i.value for i in at.info)
    (app_env / "results").mkdir()
    rep = {"dataset": "pneumoniamnist", "model": "tiny", "n": 10, "modes": {
        "float": {"accuracy": 0.9, "auc": 0.95, "latency_median_s": 0.001, "latency_p90_s": 0.002},
        "fhe": {"accuracy": 0.88, "auc": 0.94, "latency_median_s": 0.5, "latency_p90_s": 0.6}},
        "targets": [{"target": "median end-to-end latency <= 150 ms", "measured": "500.0 ms", "met": False}]}
    (app_env / "results" / "x.json").write_text(json.dumps(rep))
    at = ok(page("dashboard/views/6_Benchmarks.py"))
    df = at.dataframe[0].value
    assert list(df["mode"]) == ["float", "fhe"] and df["latency_median_ms"].tolist() == [1.0, 500.0]
    assert len(at.get("plotly_chart")) == 2
    lat = json.loads(at.get("plotly_chart")[1].proto.spec)["layout"]["yaxis"]
    assert lat["ticktext"] == ["1 ms", "10 ms", "100 ms", "1000 ms"] and "ms, log scale" in lat["title"]["text"]
    met = at.dataframe[1].value
    assert met["measured"].tolist() == ["500.0 ms"] and met["met"].tolist() == [False]
