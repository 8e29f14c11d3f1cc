"""The dashboard in a real headless Chromium: `streamlit run app.py` on localhost, driven by
Playwright (Debian's chromium; Playwright's own browser download is not used)."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_saved, models_dir, cache_dir, data_dir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("streamlit") / "server.log"
    env = {**os.environ, "ENGINE_MODELS_DIR": str(models_dir), "ENGINE_CACHE_DIR": str(cache_dir),
           "MEDMNIST_DIR": str(data_dir)}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
             "--server.address", "127.0.0.1", "--server.headless", "true"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"streamlit did not start: {log.read_text()[-2000:]}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        yield b
        b.close()


def test_encrypted_prediction_in_browser(server, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(server)
    page.get_by_text("Encrypted medical image classification").wait_for(timeout=60_000)
    page.get_by_role("button", name="Encrypt and classify").click()
    result = page.get_by_text("Encrypted prediction:")
    result.wait_for(timeout=180_000)
    text = result.inner_text()
    assert any(lbl in text for lbl in ("normal", "pneumonia")) and "ms end to end" in text
    page.locator('[data-testid="stDataFrame"]').first.wait_for(timeout=30_000)
    assert page.get_by_text("key generation").count() >= 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "home_encrypted_prediction.png"), full_page=True)
    page.close()


def test_upload_in_browser(server, browser, tmp_path):
    img = (np.random.default_rng(0).integers(0, 255, (120, 90))).astype(np.uint8)
    path = tmp_path / "xray.png"
    Image.fromarray(img).save(path)
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(f"{server}/Upload")
    page.get_by_text("Classify your own image, encrypted").wait_for(timeout=60_000)
    page.locator('input[type="file"]').set_input_files(str(path))
    page.get_by_text("center-cropped 90x120 to 90x90").wait_for(timeout=60_000)
    page.get_by_role("button", name="Encrypted prediction").click()
    page.get_by_text("Encrypted prediction:").wait_for(timeout=180_000)
    page.locator('[data-testid="stDataFrame"]').first.wait_for(timeout=30_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "upload_encrypted_prediction.png"), full_page=True)
    page.close()
