"""The dashboard in a real headless Chromium: `streamlit run app.py` on localhost, driven by
Playwright (Debian's chromium; Playwright's own browser download is not used)."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from urllib.parse import urlparse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, wait_healthy
from engine.serve.ports import free_port

ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


def chromium_path() -> str:
    for cand in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", "/usr/bin/chromium-browser", shutil.which("chromium")):
        if cand and os.path.exists(cand):
            return cand
    pytest.fail("Chromium not found: install it (apt-get install chromium) or set CHROMIUM=/path/to/chromium",
                pytrace=False)


def start_app(cwd: Path, env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    """`streamlit run app.py` in ``cwd`` on a free loopback port, in a process group of its own;
    (process, URL) once Streamlit answers."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
             "--server.address", "127.0.0.1", "--server.headless", "true"],
            cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read() == b"ok":
                return proc, url
        except OSError:
            time.sleep(0.5)
    stop_app(proc)
    pytest.fail(f"streamlit did not start: {log.read_text()[-2000:]}")


def stop_app(proc: subprocess.Popen) -> None:
    proc.terminate()  # the app stops the service and key makers it started
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        pass
    try:  # whatever is left of its process group (the app's children included)
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture(scope="module", params=["service started by the app", "ENGINE_SERVER_URL"])
def server(request, tiny_saved, models_dir, cache_dir, data_dir, tmp_path_factory):
    """The dashboard, once with the service it starts itself and once pointed at a service
    started separately (``python -m engine serve``) through ENGINE_SERVER_URL."""
    folder = tmp_path_factory.mktemp("streamlit")
    log = folder / "server.log"
    env = {**os.environ, "ENGINE_MODELS_DIR": str(models_dir), "ENGINE_CACHE_DIR": str(cache_dir),
           "MEDMNIST_DIR": str(data_dir), "ENGINE_KEY_SPARES": "2"}
    env.pop("ENGINE_SERVER_URL", None)
    service = None
    if request.param == "ENGINE_SERVER_URL":
        service_port = free_port()
        service_log = open(folder / "service.log", "w")
        service = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--port", str(service_port),
                                    "--models-dir", str(models_dir), "--cache-dir", str(cache_dir)],
                                   cwd=REPO, env=env, stdout=service_log, stderr=subprocess.STDOUT)
        env["ENGINE_SERVER_URL"] = f"http://127.0.0.1:{service_port}"
        wait_healthy(env["ENGINE_SERVER_URL"], folder / "service.log", "the service")
    proc = None
    try:
        proc, url = start_app(REPO, env, log)
        yield url, request.param, env.get("ENGINE_SERVER_URL")
    finally:
        if proc is not None:
            stop_app(proc)
        if service is not None:
            service.terminate()
            service.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        yield b
        b.close()


def _tag(mode: str) -> str:
    return "external" if mode == "ENGINE_SERVER_URL" else "app-started"


def test_encrypted_prediction_in_browser(server, browser):
    server, mode, external = server
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    elsewhere = []  # a medical demo's page asks no third party for anything (nor could it, offline)
    page.on("request", lambda r: None if urlparse(r.url).hostname in ("127.0.0.1", "localhost") or
            r.url.startswith(("data:", "blob:")) else elsewhere.append(r.url))
    page.goto(server)
    page.get_by_text("Encrypted medical image classification").wait_for(timeout=60_000)
    page.get_by_role("button", name="Encrypt and classify").click()
    result = page.get_by_text("Encrypted prediction:")
    result.wait_for(timeout=180_000)
    text = result.inner_text()
    assert any(lbl in text for lbl in ("normal", "pneumonia")) and "ms end to end" in text
    page.locator("table").get_by_text("Encrypted (FHE)").first.wait_for(timeout=30_000)
    wire = page.get_by_text("What crossed the wire")
    wire.wait_for(timeout=30_000)
    if external:  # the predictions went to the separately started service
        page.get_by_text(f"{external} (ENGINE_SERVER_URL)").first.wait_for(timeout=30_000)
    else:
        page.get_by_text("started by this app").first.wait_for(timeout=30_000)
    assert not elsewhere, elsewhere
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"home_encrypted_prediction_{_tag(mode)}.png"), full_page=True)
    page.close()


def test_upload_in_browser(server, browser, tmp_path):
    server, mode, _ = server
    img = (np.random.default_rng(0).integers(0, 255, (120, 90))).astype(np.uint8)
    path = tmp_path / "xray.png"
    Image.fromarray(img).save(path)
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(f"{server}/Upload")
    page.get_by_text("Classify your own images, encrypted").wait_for(timeout=60_000)
    page.locator('input[type="file"]').wait_for(state="attached", timeout=180_000)  # after the input check is ready
    page.locator('input[type="file"]').set_input_files(str(path))
    page.get_by_text("center-cropped 90x120 to 90x90").wait_for(timeout=60_000)
    page.get_by_text("does not look like a pneumoniamnist image").wait_for(timeout=60_000)  # random noise
    page.get_by_role("button", name="Encrypted prediction").click()
    page.get_by_text("Encrypted prediction:").wait_for(timeout=180_000)
    # the input check flagged it: the answer is marked uncertain and given no confidence
    assert "no confidence is given for an image the input check flagged" in page.content()
    assert "calibrated confidence" not in page.content()
    page.locator('[data-testid="stDataFrame"]').first.wait_for(timeout=30_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"upload_encrypted_prediction_{_tag(mode)}.png"), full_page=True)
    page.close()


def test_batch_upload_in_browser(server, browser, tmp_path, data_dir):
    import zipfile

    from engine.learn.data import DataConfig, load_split

    server, mode, _ = server
    if mode == "ENGINE_SERVER_URL":
        pytest.skip("the batch table does not depend on where the service runs")
    val = load_split(DataConfig("pneumoniamnist", data_dir=str(data_dir), allow_download=False), "val")
    files = []
    for i in range(2):
        Image.fromarray(val.images[i]).save(tmp_path / f"scan{i}.png")
        files.append(str(tmp_path / f"scan{i}.png"))
    with zipfile.ZipFile(tmp_path / "more.zip", "w") as z:
        z.write(tmp_path / "scan0.png", "more/scan0.png")
        z.writestr("more/black.png", _png(np.zeros((3, 3), np.uint8)))
    files.append(str(tmp_path / "more.zip"))
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(f"{server}/Upload")
    page.get_by_text("Classify your own images, encrypted").wait_for(timeout=60_000)
    page.locator('input[type="file"]').wait_for(state="attached", timeout=180_000)
    page.locator('input[type="file"]').set_input_files(files)
    page.get_by_text("4 files: 4 images, 1 flagged as unlike the training data").wait_for(timeout=60_000)
    page.get_by_role("button", name="Encrypted predictions for 4 images").click()
    page.get_by_role("button", name="Download CSV").wait_for(timeout=180_000)
    with page.expect_download() as dl:
        page.get_by_role("button", name="Download CSV").click()
    csv = Path(dl.value.path()).read_text()
    lines = csv.strip().splitlines()
    assert lines[0].startswith("file,prediction,confidence,uncertain,warning") and len(lines) == 5
    assert sum(1 for line in lines[1:] if "more.zip/more/black.png" in line and "only 3x3" in line) == 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "upload_batch_table.png"), full_page=True)
    page.close()


def test_validation_from_a_zip_in_browser(server, browser, tmp_path, data_dir):
    """A zip of class folders (one mapped, one unreadable file): encrypted validation with a
    progress bar, the confusion heatmap, the reliability diagram, the table and the CSV."""
    import zipfile

    from engine.learn.data import DataConfig, load_split

    server, mode, _ = server
    if mode == "ENGINE_SERVER_URL":
        pytest.skip("the validation report does not depend on where the service runs")
    val = load_split(DataConfig("pneumoniamnist", data_dir=str(data_dir), allow_download=False), "val")
    path = tmp_path / "labelled.zip"
    with zipfile.ZipFile(path, "w") as z:
        for folder, label in (("HEALTHY", 0), ("pneumonia", 1)):
            for i in np.flatnonzero(val.labels[:, 0] == label)[:2]:
                z.writestr(f"clinic/{folder}/img{i}.png", _png(val.images[i]))
        z.writestr("clinic/pneumonia/broken.png", b"not a png")
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(f"{server}/Validate")
    page.get_by_role("heading", name="Validate on your own labelled images").wait_for(timeout=120_000)
    # Each step waits for what it makes the page show (no upload while a rerun replaces the widgets):
    # the zip first, whose unmapped folder is a clear error, then the mapping that resolves it.
    page.locator('input[type="file"]').wait_for(state="attached", timeout=120_000)
    page.locator('input[type="file"]').set_input_files(str(path))
    page.get_by_text("Folder 'HEALTHY' in labelled.zip matches no").wait_for(timeout=120_000)
    mapping = page.locator('input[aria-label="Map other folder names (optional)"]')
    mapping.fill("HEALTHY=0")
    mapping.press("Enter")
    page.get_by_text("5 files").wait_for(timeout=120_000)
    page.get_by_role("button", name="Validate 5 images, encrypted").click()
    page.get_by_text("Accuracy (encrypted)").wait_for(timeout=240_000)
    # the rest of the report follows in the same run (waited for, not read from a snapshot)
    page.get_by_text("Recall per class").first.wait_for(timeout=30_000)
    page.get_by_text("Not classified: pneumonia/broken.png").first.wait_for(timeout=30_000)
    page.locator(".js-plotly-plot").nth(1).wait_for(timeout=30_000)  # confusion heatmap and reliability diagram
    page.locator('[data-testid="stDataFrame"]').first.wait_for(timeout=30_000)
    with page.expect_download() as dl:
        page.get_by_role("button", name="Download CSV").click()
    csv = Path(dl.value.path()).read_text()
    assert csv.splitlines()[0].startswith("file,true,prediction,right,confidence") and len(csv.splitlines()) == 5
    # the operating point: its curve and table, chosen for a recall target, downloaded as JSON
    page.get_by_role("heading", name="Operating point").wait_for(timeout=30_000)
    page.locator(".js-plotly-plot").nth(2).wait_for(timeout=30_000)  # the ROC curve
    page.get_by_role("button", name="Use this operating point").click()
    page.get_by_text("In force for this session").first.wait_for(timeout=60_000)
    with page.expect_download() as dl:
        page.get_by_role("button", name="Download the operating point (JSON)").click()
    point = json.loads(Path(dl.value.path()).read_text())
    assert point["chosen_by"] == "recall >= 0.95" and point["images"]["n"] == 4 and point["dataset"] == "pneumoniamnist"
    # the point stays in force for this browser session: the Upload page's answers name it
    page.get_by_role("link", name="Upload").first.click()
    page.get_by_text("Classify your own images, encrypted").wait_for(timeout=60_000)
    scans = []
    for i in range(2):
        Image.fromarray(val.images[i]).save(tmp_path / f"scan{i}.png")
        scans.append(str(tmp_path / f"scan{i}.png"))
    page.locator('input[type="file"]').wait_for(state="attached", timeout=180_000)
    page.locator('input[type="file"]').set_input_files(scans)
    page.get_by_role("button", name="Encrypted predictions for 2 images").click()
    page.get_by_role("button", name="Download CSV").wait_for(timeout=180_000)
    # the page's sidebar and the batch table's caption both name the point
    assert page.get_by_text("Answers decided by operating point: pneumonia when").count() >= 2
    with page.expect_download() as dl:
        page.get_by_role("button", name="Download CSV").click()
    assert Path(dl.value.path()).read_text().splitlines()[0].startswith("file,prediction,decision (operating point)")
    assert page.locator('[data-testid="stException"]').count() == 0
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "validate_encrypted.png"), full_page=True)
    page.close()


PAGES = [("", "Home", "Encrypted medical image classification"), ("Upload", "Upload", "Classify your own images"),
         ("Encrypted_inference", "Encrypted inference", "Encrypted inference"), ("Train", "Train", "Train a quantization-aware model"),
         ("Compile", "Compile", "Compile to an FHE circuit"), ("Bit-width_explorer", "Bit-width explorer", "Accuracy against bit-width"),
         ("Benchmarks", "Benchmarks", "Benchmarks"), ("Validate", "Validate", "Validate on your own labelled images")]


def test_every_page_renders_with_grouped_navigation(server, browser):
    server, mode, _ = server
    if mode == "ENGINE_SERVER_URL":
        pytest.skip("one set of screenshots is enough")
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    for path, title, heading in PAGES:
        page.goto(f"{server}/{path}")
        page.get_by_role("heading", name=heading).first.wait_for(timeout=120_000)
        nav = page.locator('[data-testid="stSidebarNav"]')
        nav.wait_for(timeout=30_000)
        text = nav.inner_text()
        for group in ("Try it", "Build", "Measure"):
            assert group in text
        assert "Home" in text and "app" not in text.split()
        page.wait_for_timeout(1500)  # charts finish drawing
        assert page.locator('[data-testid="stException"]').count() == 0, title
        page.screenshot(path=str(ARTIFACTS / f"page_{title.lower().replace(' ', '_')}.png"), full_page=True)
    page.close()


def _png(arr) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_home_answers_on_a_fresh_clone(browser, tmp_path):
    """`streamlit run app.py` in a fresh `git clone` of this repository (its committed state): no
    `.cache/` (nothing compiled, no key made) and no dataset file. Home shows the start-up and
    then answers, saying which key set did (times: bench/startup.py)."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    (tmp_path / "no-data").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENGINE_")}
    env["MEDMNIST_DIR"] = str(tmp_path / "no-data")
    log = tmp_path / "streamlit.log"
    proc, url = start_app(clone, env, log)
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    try:
        page.goto(url)
        page.get_by_text("Encrypted medical image classification").wait_for(timeout=60_000)
        page.get_by_role("button", name="Encrypt and classify").click()
        page.get_by_text("Encrypted prediction:").wait_for(timeout=300_000)
        note = page.get_by_text("Encrypted and decrypted with").first.inner_text()
        assert note.startswith(("Encrypted and decrypted with the app's shared key set",
                                "Encrypted and decrypted with this session's own keys"))
        assert page.locator('[data-testid="stException"]').count() == 0
        assert (clone / ".cache" / "circuits").is_dir() and not any((clone / ".cache" / "circuits").glob("*/warmup/evaluation_keys.bin"))
    except Exception:
        print(log.read_text()[-3000:])
        raise
    finally:
        page.close()
        stop_app(proc)
