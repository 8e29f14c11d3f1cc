"""Fresh browser sessions against the dashboard: time to the first encrypted answer, and the
Streamlit process's memory. Loopback only; bounded in sessions and time.

    python bench/dashboard_sessions.py --sessions 8 --json bench/results/dashboard_sessions.json

It starts `streamlit run app.py` (which starts its own service) on a free loopback port, opens
the Home page once to let the app prepare (service start-up, spare keys), then measures:
1. one fresh session alone: navigation start -> "Encrypt and classify" visible (page ready) ->
   clicked at once -> "Encrypted prediction" visible;
2. N fresh sessions at once, the same way;
and reads the Streamlit process's resident memory (not its service child) before and after.
Chromium: Debian's (`CHROMIUM` overrides), driven by Playwright.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
from engine.serve.ports import free_port

from bench import publish

REPO = Path(__file__).resolve().parent.parent
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


async def one_session(browser, url: str, timeout_ms: int = 120_000) -> dict:
    ctx = await browser.new_context(viewport={"width": 1300, "height": 1000})
    page = await ctx.new_page()
    t0 = time.perf_counter()
    await page.goto(url, wait_until="load", timeout=timeout_ms)
    t_load = time.perf_counter() - t0  # the browser's load event: HTML and the app's scripts
    button = page.get_by_role("button", name="Encrypt and classify")
    await button.wait_for(timeout=timeout_ms)
    t_ready = time.perf_counter() - t0
    await button.click()
    await page.get_by_text("Encrypted prediction:").wait_for(timeout=timeout_ms)
    t_answer = time.perf_counter() - t0
    return {"context": ctx, "load_event_s": t_load, "page_ready_s": t_ready, "first_answer_s": t_answer}


def cpu_seconds(proc: psutil.Process) -> dict:
    """CPU time so far of the browser (every Chromium process), the Streamlit process, and its
    children (the service, key makers): on this 2-core machine they all share the same cores."""
    def total(ps):
        out = 0.0
        for p in ps:
            try:
                t = p.cpu_times()
                out += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                pass
        return out
    browser = [p for p in psutil.process_iter(["name"]) if "chrom" in (p.info["name"] or "").lower()]
    return {"browser": total(browser), "streamlit": total([proc]), "service_and_key_makers": total(proc.children(recursive=True))}


def machine_seconds() -> dict:
    """The whole machine's CPU time so far from /proc/stat: busy, idle, and stolen by the host."""
    try:
        f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    return {"busy": (f[0] + f[1] + f[2] + f[5] + f[6]) / tick, "idle": (f[3] + f[4]) / tick, "steal": f[7] / tick}


async def measure(url: str, sessions: int, proc: psutil.Process, settle_s: float = 60) -> dict:
    from playwright.async_api import async_playwright

    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=FLAGS)
        warm = await one_session(browser, url, 600_000)  # the app prepares: service, spare keys
        await warm["context"].close()
        await asyncio.sleep(settle_s)  # let the key pool fill: nobody else busy
        rss_before = proc.memory_info().rss
        alone = await one_session(browser, url)
        await asyncio.sleep(25)
        cpu0, m0 = cpu_seconds(proc), machine_seconds()
        crowd = await asyncio.gather(*[one_session(browser, url, 300_000) for _ in range(sessions)])
        cpu1, m1 = cpu_seconds(proc), machine_seconds()
        rss_after = proc.memory_info().rss
        for s in [alone, *crowd]:
            await s["context"].close()
        await browser.close()
    per_session = (rss_after - rss_before) / (sessions + 1)
    return {
        "first_visit_s": warm["first_answer_s"],
        "fresh_session_alone_first_answer_s": alone["first_answer_s"],
        "fresh_session_alone_load_event_s": alone["load_event_s"],
        "fresh_session_alone_answer_after_load_s": alone["first_answer_s"] - alone["load_event_s"],
        "fresh_session_alone_page_ready_s": alone["page_ready_s"],
        "fresh_session_alone_answer_after_ready_s": alone["first_answer_s"] - alone["page_ready_s"],
        "sessions": sessions,
        "crowd_first_answer_s": [round(s["first_answer_s"], 3) for s in crowd],
        "crowd_first_answer_max_s": max(s["first_answer_s"] for s in crowd),
        "crowd_page_ready_s": [round(s["page_ready_s"], 3) for s in crowd],
        "crowd_load_event_s": [round(s["load_event_s"], 3) for s in crowd],
        "crowd_cpu_seconds": {k: round(cpu1[k] - cpu0[k], 2) for k in cpu0},
        "crowd_machine_seconds": {k: round(m1[k] - m0[k], 2) for k in m0},  # every process, both cores
        "streamlit_rss_before_bytes": rss_before,
        "streamlit_rss_after_bytes": rss_after,
        "streamlit_rss_per_session_bytes": per_session,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--json", default=None)
    ap.add_argument("--app", default="app.py", help="another Streamlit script with the same button and answer "
                    "text, for a baseline of what the browser and Streamlit alone cost")
    ap.add_argument("--settle", type=float, default=60, help="seconds to let the app fill its key pool")
    a = ap.parse_args()
    port = free_port()
    log = open(REPO / ".cache" / "dashboard_sessions.log", "w") if (REPO / ".cache").exists() else subprocess.DEVNULL
    env = {k: v for k, v in os.environ.items() if k != "ENGINE_SERVER_URL"}
    app = subprocess.Popen([sys.executable, "-m", "streamlit", "run", a.app, "--server.port", str(port),
                            "--server.address", "127.0.0.1", "--server.headless", "true"],
                           cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        result = asyncio.run(measure(url, a.sessions, psutil.Process(app.pid), a.settle))
    finally:
        app.terminate()
        app.wait(timeout=60)
    result["command"] = f"python bench/dashboard_sessions.py --sessions {a.sessions}" + (f" --app {a.app}" if a.app != "app.py" else "")
    publish(result, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
