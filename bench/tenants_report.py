"""Measure the service for real tenants (issue 19's targets) and write bench/results/tenants.json and .md.

Reproduce (2 cores, shipped models; every server runs on a free loopback port and is stopped
here; takes about 15 minutes):

    python bench/tenants_report.py                # everything
    python bench/tenants_report.py --only load    # or: restart, overhead, security

- load: ``serve --key-store-bytes 4GiB`` and ``1GiB`` (with the key folder), ``loadtest
  --clients 8 --requests 3`` against each, then ``--clients 32 --requests 2`` against 1 GiB;
- restart: a client registers and predicts, the service stops and starts again with the same
  ``--key-dir``, and the client's next prediction is timed (no upload allowed);
- overhead: one client's median latency without tokens over HTTP, and with a token over HTTPS
  (this script's own CA), alternated;
- security: 401 without a token or with a wrong one, 404 with another tenant's key id, plain
  HTTP on the TLS port refused.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from engine.serve.client import EncryptedClient
from engine.serve.loadtest import markdown, run_loadtest
from engine.serve.ports import free_port
from engine.serve.transports import HTTPTransport
from engine.study.evaluate import machine_info

REPO = Path(__file__).resolve().parent.parent

GIB = 2**30
OUT = REPO / "bench" / "results"


class Server:
    """``python -m engine serve`` in a child process on a loopback port."""

    def __init__(self, *args: str, port: int | None = None, scheme: str = "http", ca: str | None = None,
                 log: Path | None = None):
        self.port = port or free_port()
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.log = log or Path(tempfile.mkstemp(prefix="serve-", suffix=".log")[1])
        self.proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--port", str(self.port), *args],
                                     cwd=REPO, stdout=self.log.open("a"), stderr=subprocess.STDOUT)
        deadline = time.time() + 900
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2, verify=ca or True).status_code == 200:
                    self.ready_s = time.time() - (deadline - 900)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("serve did not become healthy")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def images(transport: HTTPTransport, cid: str) -> np.ndarray:
    """Test images as the client's features for circuit ``cid``."""
    from engine.learn.data import load_samples
    from engine.learn.features import remote_features

    c = next(c for c in transport.circuits() if c["id"] == cid)
    return remote_features(load_samples(c["dataset"]).images, c)


def load(say, runs=(("c8_4gib", "4GiB", 8, 3), ("c8_1gib", "1GiB", 8, 3), ("c32_1gib", "1GiB", 32, 2)),
         extra: tuple[str, ...] = ()) -> dict:
    out = {}
    for name, store, clients, requests in runs:
        s = Server("--key-store-bytes", store, *extra)
        try:
            say(f"{clients} x {requests} at {store}")
            out[name] = run_loadtest(s.url, clients, requests, say=say)
        finally:
            s.stop()
    return out


def restart(say, tries: int = 3) -> dict:
    rows = []
    for t in range(tries):
        key_dir = tempfile.mkdtemp(prefix="keys-")
        s = Server("--key-dir", key_dir)
        port = s.port
        try:
            folder = Path(tempfile.mkdtemp(prefix="restart-client-"))
            transport = HTTPTransport(s.url)
            cid = next(c["id"] for c in transport.circuits() if c["dataset"] == "pneumoniamnist" and c["batch_size"] == 1)
            client = EncryptedClient.download(transport, cid, folder)
            x = images(transport, cid)
            warm = []
            for i in range(6):
                t0 = time.perf_counter()
                client.predict(x[i][None])
                warm.append(time.perf_counter() - t0)
        finally:
            s.stop()
        s = Server("--key-dir", key_dir, port=port)
        try:
            t0 = time.perf_counter()
            client.predict(x[7][None])
            first = time.perf_counter() - t0
            rows.append({"warm_median_s": float(np.median(warm[1:])), "first_after_restart_s": first,
                         "uploads": client.uploads, "restart_ready_s": s.ready_s})
            say(f"restart {t + 1}: warm {np.median(warm[1:]):.3f} s, first after restart {first:.3f} s, "
                f"uploads {client.uploads}, ready after {s.ready_s:.1f} s")
        finally:
            s.stop()
            transport.close()
    return {"tries": rows}


def _tls_material(folder: Path) -> tuple[str, str, str]:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = [folder / "ca.pem", folder / "cert.pem", folder / "key.pem"]
    ca.cert_pem.write_to_path(str(paths[0]))
    cert.cert_chain_pems[0].write_to_path(str(paths[1]))
    cert.private_key_pem.write_to_path(str(paths[2]))
    return tuple(str(p) for p in paths)


def secure_server(folder: Path) -> tuple[Server, dict, str]:
    from engine.serve.tenants import add_token

    tokens = folder / "tokens.json"
    tok = {n: add_token(tokens, n) for n in ("alice", "bob")}
    ca, cert, key = _tls_material(folder)
    s = Server("--tokens", str(tokens), "--ssl-certfile", cert, "--ssl-keyfile", key, scheme="https", ca=ca)
    return s, tok, ca


def overhead(say, requests: int = 15, rounds: int = 2) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="tls-"))
    plain = Server()
    secure, tok, ca = secure_server(folder)
    try:
        p50 = {"plain": [], "secure": []}
        for r in range(rounds):
            for kind in ("plain", "secure"):
                res = (run_loadtest(plain.url, 1, requests) if kind == "plain"
                       else run_loadtest(secure.url, 1, requests, token=tok["alice"], ca_file=ca))
                p50[kind].append(res["latency_p50_s"])
                say(f"round {r + 1} {kind}: p50 {1000 * res['latency_p50_s']:.0f} ms")
    finally:
        plain.stop()
        secure.stop()
    a, b = float(np.median(p50["plain"])), float(np.median(p50["secure"]))
    return {"plain_p50_s": a, "secure_p50_s": b, "overhead": (b - a) / a, "runs": p50}


def security(say) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="sec-"))
    s, tok, ca = secure_server(folder)
    try:
        def get(path, token=None, **kw):
            headers = {"authorization": f"Bearer {token}"} if token else {}
            return httpx.get(f"{s.url}{path}", headers=headers, verify=ca, timeout=30, **kw)

        out = {"no_token": get("/circuits").status_code, "wrong_token": get("/circuits", "x" * 43).status_code}
        transport = HTTPTransport(s.url, token=tok["alice"], ca_file=ca)
        cid = next(c["id"] for c in transport.circuits() if c["batch_size"] == 1)
        alice = EncryptedClient.download(transport, cid, folder / "alice")
        key_id = alice.register()
        ct = alice.fhe.encrypt(images(transport, cid)[:1])
        r = httpx.post(f"{s.url}/circuits/{cid}/predict", content=ct, verify=ca, timeout=60,
                       headers={"x-key-id": key_id, "authorization": f"Bearer {tok['bob']}"})
        out["other_tenants_key"] = r.status_code
        r = httpx.delete(f"{s.url}/circuits/{cid}/keys/{key_id}", verify=ca, timeout=60,
                         headers={"authorization": f"Bearer {tok['bob']}"})
        out["other_tenants_delete"] = r.status_code
        try:
            httpx.get(f"http://127.0.0.1:{s.port}/health", timeout=10)
            out["plain_http_on_tls_port"] = "answered"
        except httpx.HTTPError as exc:
            out["plain_http_on_tls_port"] = f"refused ({type(exc).__name__})"
        say(str(out))
    finally:
        s.stop()
    return out


def table(res: dict) -> list[tuple[str, str, bool]]:
    rows = []
    sec = res.get("security")
    if sec:
        rows.append(("no token, wrong token: 401", f"{sec['no_token']}, {sec['wrong_token']}",
                     sec["no_token"] == 401 and sec["wrong_token"] == 401))
        rows.append(("another tenant's key id: 404 (predict, delete)",
                     f"{sec['other_tenants_key']}, {sec['other_tenants_delete']}",
                     sec["other_tenants_key"] == 404 and sec["other_tenants_delete"] == 404))
        rows.append(("plain HTTP on the TLS port fails", sec["plain_http_on_tls_port"],
                     sec["plain_http_on_tls_port"].startswith("refused")))
    ld = res.get("load")
    if ld:
        a, b, c = ld["c8_4gib"], ld["c8_1gib"], ld["c32_1gib"]
        share = b["throughput_rps"] / a["throughput_rps"]
        rows.append(("1 GiB, 8 x 3: 0 errors, no re-upload", f"{b['errors']} errors, {b['key_reuploads']} re-uploads "
                     f"({b['server_key_reloads']} server reloads)", b["errors"] == 0 and b["key_reuploads"] == 0))
        rows.append(("1 GiB, 8 x 3: throughput >= 50% of 4 GiB's", f"{100 * share:.0f}% ({b['throughput_rps']:.2f} vs "
                     f"{a['throughput_rps']:.2f} req/s)", share >= 0.5))
        rows.append(("1 GiB, 8 x 3: p95 <= 6 s", f"{b['latency_p95_s']:.2f} s", b["latency_p95_s"] <= 6))
        rows.append(("1 GiB, 32 clients: 0 errors, no re-upload", f"{c['errors']} errors, {c['key_reuploads']} re-uploads "
                     f"({c['server_key_reloads']} server reloads)", c["errors"] == 0 and c["key_reuploads"] == 0))
        runs = (a, b, c)
        if all("answers_differing" in r for r in runs):
            rows.append(("every run: answers re-sent alone after the crowd are unchanged",
                         " / ".join(f"{r['answers_differing']} of {r['answers_rechecked']} differ" for r in runs),
                         all(r["answers_differing"] == 0 and r["answers_rechecked"] == r["clients"] for r in runs)))
        rows.append(("1 GiB, 32 clients: server RSS <= 1.5 GiB", f"{c['server_rss_peak_bytes'] / GIB:.2f} GiB",
                     c["server_rss_peak_bytes"] <= 1.5 * GIB))
    rs = res.get("restart")
    if rs:
        worst = max(r["first_after_restart_s"] / r["warm_median_s"] for r in rs["tries"])
        ups = max(r["uploads"] for r in rs["tries"])
        rows.append(("restart, same --key-dir: no re-upload", f"{ups} upload(s) per client in all", ups == 1))
        pairs = ", ".join(f"{r['first_after_restart_s']:.2f} / {r['warm_median_s']:.2f} s" for r in rs["tries"])
        rows.append(("restart: first answer within 2x a warm one", f"worst of {len(rs['tries'])}: {worst:.2f}x ({pairs})",
                     worst <= 2))
    ov = res.get("overhead")
    if ov:
        rows.append(("tokens + TLS: median latency overhead <= 5%", f"{100 * ov['overhead']:+.1f}% "
                     f"({1000 * ov['secure_p50_s']:.0f} vs {1000 * ov['plain_p50_s']:.0f} ms)", ov["overhead"] <= 0.05))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["load", "restart", "overhead", "security"], action="append")
    ap.add_argument("--out", default=str(OUT / "tenants"))
    a = ap.parse_args()
    say = lambda m: print(m, flush=True)  # noqa: E731
    parts = a.only or ["security", "overhead", "restart", "load"]
    path = Path(a.out + ".json")
    res = json.loads(path.read_text()) if path.exists() else {}
    for part in parts:
        res[part] = {"security": security, "overhead": overhead, "restart": restart, "load": load}[part](say)
        res["machine"] = machine_info()
        path.write_text(json.dumps(res, indent=2))
    rows = table(res)
    md = ["# Service for real tenants (issue 19)", "", f"`python bench/tenants_report.py` on {res['machine']}", "",
          "| target | measured | met |", "|---|---|---|"]
    md += [f"| {t} | {m} | {'yes' if ok else 'no'} |" for t, m, ok in rows]
    if "load" in res:
        md += ["", markdown([res["load"][k] for k in ("c8_4gib", "c8_1gib", "c32_1gib")])]
    Path(a.out + ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
