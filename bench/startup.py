"""The first minute: from `streamlit run app.py` to the first encrypted answer on Home, on a fresh
clone and on a restart, then a room of sessions opened together. Loopback only, bounded in time.

    python bench/startup.py [--sessions 8] [--json bench/results/startup.json]

1. `git clone` of this repository into a temporary folder (no `.cache/`: nothing compiled or
   generated yet) and no dataset file (`MEDMNIST_DIR` points at an empty folder: the gallery is
   the shipped samples);
2. **fresh**: `streamlit run app.py`; a headless Chromium opens Home as soon as the port answers,
   waits for "Encrypt and classify", clicks it at once and waits for "Encrypted prediction";
3. then N fresh sessions open together and click as soon as their button shows (the time of
   each counts from its own click, as a visitor feels it);
4. **restart**: the app is stopped and started again in the same clone (caches warm), and step 2
   is repeated.

Times are seconds from the `streamlit run` command. The service's own start-up steps come from
its log (`.cache/service.log` in the clone), the key makers' from theirs (`.cache/keymaker.log`),
with their times from the command.
Chromium: Debian's (`CHROMIUM` overrides), driven by Playwright.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import publish
from bench.dashboard_sessions import FLAGS  # the same browser as the sessions benchmark
from engine.serve.ports import free_port

REPO = Path(__file__).resolve().parent.parent


async def first_answer(browser, url: str, t0: float, deadline_s: float) -> dict:
    """Open Home as soon as it loads; click as soon as the button shows; times from ``t0``."""
    ctx = await browser.new_context(viewport={"width": 1300, "height": 1000})
    page = await ctx.new_page()
    while True:
        try:
            await page.goto(url, wait_until="load", timeout=5_000)
            break
        except Exception:  # noqa: BLE001 - the server is not listening yet
            if time.perf_counter() - t0 > deadline_s:
                raise
            await asyncio.sleep(0.1)
    loaded = time.perf_counter() - t0
    await page.get_by_text("Encrypted medical image classification").wait_for(timeout=deadline_s * 1000)
    painted = time.perf_counter() - t0
    button = page.get_by_role("button", name="Encrypt and classify")
    await button.wait_for(timeout=deadline_s * 1000)
    ready = time.perf_counter() - t0
    await button.click()
    clicked = time.perf_counter() - t0
    try:
        await page.get_by_text("Encrypted prediction:").wait_for(timeout=deadline_s * 1000)
    except Exception:
        print("--- the page when no answer came:\n" + await page.inner_text("body"), file=sys.stderr)
        raise
    answered = time.perf_counter() - t0
    note = page.get_by_text("Encrypted and decrypted with")
    which = await note.first.text_content() if await note.count() else ""
    await ctx.close()
    return {"load_event_s": round(loaded, 2), "title_s": round(painted, 2), "button_s": round(ready, 2),
            "click_s": round(clicked, 2), "answer_s": round(answered, 2), "after_click_s": round(answered - clicked, 2),
            "key_note": which.strip()}


class LogWatch(threading.Thread):
    """The lines a log gains from now on, each stamped with its time from ``t0`` (polled every 0.1 s)."""

    def __init__(self, path: Path, t0: float):
        super().__init__(daemon=True)
        self.path, self.t0, self.lines, self.stop = path, t0, [], threading.Event()
        self.offset = path.stat().st_size if path.exists() else 0

    def run(self) -> None:
        while not self.stop.wait(0.1):
            if not self.path.exists():
                continue
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
            cut = chunk.rfind(b"\n") + 1
            self.offset += cut
            for line in chunk[:cut].decode(errors="replace").splitlines():
                if line.strip():
                    self.lines.append(f"{time.perf_counter() - self.t0:6.1f} s  {line.strip()}")


async def run_app(clone: Path, env: dict, sessions: int, deadline_s: float) -> dict:
    from playwright.async_api import async_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    log = open(clone / "streamlit.log", "ab")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=FLAGS)
        t0 = time.perf_counter()
        (clone / ".cache").mkdir(exist_ok=True)
        watch = LogWatch(clone / ".cache" / "service.log", t0)
        makers = LogWatch(clone / ".cache" / "keymaker.log", t0)
        watch.start()
        makers.start()
        app = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                                "--server.address", "127.0.0.1", "--server.headless", "true"],
                               cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            try:
                first = await first_answer(browser, url, t0, deadline_s)
            except Exception:
                for f in (clone / "streamlit.log", clone / ".cache" / "service.log"):
                    if f.exists():
                        print(f"--- {f} (end)\n{f.read_text(errors='replace')[-4000:]}", file=sys.stderr)
                raise
            room = []
            if sessions:
                room = await asyncio.gather(*[first_answer(browser, url, time.perf_counter(), deadline_s)
                                              for _ in range(sessions)])
        finally:
            app.terminate()  # the app stops the service and key makers it started...
            try:
                app.wait(timeout=60)
            except subprocess.TimeoutExpired:
                out_of_time = True
            else:
                out_of_time = False
            time.sleep(2)
            left = subprocess.run(["pgrep", "-g", str(app.pid)], capture_output=True, text=True).stdout.split()
            try:  # ...and whatever is left of its process group goes, so the next run has the cores
                os.killpg(app.pid, 9)
            except ProcessLookupError:
                pass
            app.wait(timeout=30)
            await browser.close()
            watch.stop.set()
            makers.stop.set()
    out = {"first": first, "service_log": watch.lines, "keymaker_log": makers.lines, "app_stopped_within_60_s": not out_of_time,
           "processes_left_after_stop": len(left)}
    if sessions:
        out["room_after_click_s"] = [r["after_click_s"] for r in room]
        out["room_max_after_click_s"] = max(r["after_click_s"] for r in room)
        out["room"] = room
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=8, help="sessions opened together after the first answer")
    ap.add_argument("--json", default=None)
    ap.add_argument("--source", default=str(REPO), help="the repository to clone (default: this one)")
    ap.add_argument("--deadline", type=float, default=300, help="seconds any one wait may take")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", a.source, str(clone)], check=True)
        empty = Path(tmp) / "no-data"
        empty.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENGINE_")}
        env["MEDMNIST_DIR"] = str(empty)
        result = {"commit": subprocess.run(["git", "-C", str(clone), "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True).stdout.strip()}
        result["fresh"] = asyncio.run(run_app(clone, env, a.sessions, a.deadline))
        time.sleep(10)  # the stopped app's processes finish exiting
        result["restart"] = asyncio.run(run_app(clone, env, 0, a.deadline))
    result["command"] = f"python bench/startup.py --sessions {a.sessions}"
    publish(result, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
