"""Scale out (issue 30): the service on a Dask cluster of worker processes, on loopback, against one
process; a worker killed -9 in the middle of a load, another added. Writes
bench/results/scaleout.json and .md.

    python bench/scaleout.py                       # 4 workers x 1 GiB, about 15 minutes on 2 cores
    python bench/scaleout.py --workers 2 --quick   # a shorter run

What it starts, all on 127.0.0.1, all stopped at the end:
- ``python -m engine serve --key-store-bytes 4GiB`` (the one-process baseline), then
- ``dask scheduler`` and N ``dask worker --nthreads 1 --no-nanny`` processes (each its own pid,
  so one can be killed -9), and ``python -m engine serve --backend dask --key-store-bytes 1GiB``
  (1 GiB bounds each worker's key sets).

The loads (``engine.serve.loadtest.run_loadtest``, as ``python -m engine loadtest``):
1. 8 clients x 3 against the baseline and against the cluster (same run, same model);
2. 32 clients x 1 against the cluster;
3. 8 clients x 6 with one worker (the one holding the most key sets) killed -9 once a quarter of
   the predictions are answered;
4. 4 new clients x 2 with a worker added as they generate their keys: when it joins, when it
   holds the circuits and its first key set.

Each worker's resident memory is read from the workers (``engine.serve.cluster.worker_state``)
every second during the loads; where each key set lives is read from the service's ``/health``
and from the workers themselves. On 2 cores this proves memory and fault handling: the
workers share the same two cores, so throughput cannot grow with workers here.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx

from engine.serve.loadtest import run_loadtest
from engine.study.evaluate import machine_info
from bench.tenants_report import Server
from engine.serve.ports import free_port

REPO = Path(__file__).resolve().parent.parent

OUT = REPO / "bench" / "results"
MODEL = "fcnn-16-w2a2i3-scatter3-real"  # the shipped default (its clients compute the scattering stage)


class Cluster:
    """``dask scheduler`` and ``dask worker`` processes on loopback."""

    def __init__(self, workers: int, log_dir: Path):
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.log_dir = log_dir
        self.env = {**os.environ, "PYTHONPATH": str(REPO)}  # the workers import engine.serve.cluster
        self.scheduler = self._spawn("scheduler", ["dask", "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                                                   "--no-dashboard"])
        from distributed import Client

        self.client = Client(self.address, timeout=60)
        self.workers: list[subprocess.Popen] = []
        for _ in range(workers):
            self.add_worker()
        self.wait_workers(workers)

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = (self.log_dir / f"{name}-{len(getattr(self, 'workers', []))}.log").open("a")
        return subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def add_worker(self) -> subprocess.Popen:
        p = self._spawn("worker", ["dask", "worker", self.address, "--nthreads", "1", "--no-nanny", "--host",
                                   "127.0.0.1", "--no-dashboard", "--memory-limit", "0"])
        self.workers.append(p)
        return p

    def wait_workers(self, n: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while len(self.client.sync(self.client.scheduler.identity, n_workers=-1)["workers"]) < n:
            if time.time() > deadline:
                raise RuntimeError(f"{n} workers did not join")
            time.sleep(0.2)

    def states(self) -> dict:
        from engine.serve.cluster import worker_state

        return self.client.run(worker_state, on_error="return")

    def pids(self) -> dict:
        return self.client.run(os.getpid, on_error="return")

    def stop(self) -> None:
        self.client.close()
        for p in [*self.workers, self.scheduler]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in [*self.workers, self.scheduler]:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


class Sampler:
    """Each worker's RSS (from the workers) and the service's placement (from /health), every second."""

    def __init__(self, cluster: Cluster, url: str):
        self.cluster, self.url = cluster, url
        self.rss_peak: dict[str, int] = {}
        self.fullest: dict = {}  # the placement seen with the most key sets since reset()
        self.on_two = 0  # most key sets seen on two workers at once
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                states = {w: s for w, s in self.cluster.states().items() if isinstance(s, dict)}
                for w, s in states.items():
                    self.rss_peak[w] = max(self.rss_peak.get(w, 0), s["rss_bytes"])
                names = [n for s in states.values() for n in s["key_sets"]]
                self.on_two = max(self.on_two, len(names) - len(set(names)))
                if len(names) >= self.fullest.get("key_sets_total", -1):
                    h = health(self.url)
                    self.fullest = {"key_sets_total": len(names), "workers_say": {w: len(s["key_sets"]) for w, s in states.items()},
                                    "service_says": {w["worker"]: w["key_sets"] for w in h.get("dask_workers", [])}}
            except Exception:  # noqa: BLE001 - a worker killed on purpose; sample again
                pass

    def reset(self) -> None:
        self.fullest, self.on_two = {}, 0

    def placement(self) -> dict:
        """The fullest placement seen since reset(): key sets per worker, as the service and the workers say."""
        return {**self.fullest, "key_sets_on_two_workers": self.on_two}

    def stop(self) -> dict:
        self._stop.set()
        self.thread.join(timeout=10)
        return self.rss_peak


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


def placement(url: str, cluster: Cluster) -> dict:
    h = health(url)
    held = {w: s["key_sets"] for w, s in cluster.states().items() if isinstance(s, dict)}
    names = [n for ks in held.values() for n in ks]
    return {"service_says": {w["worker"]: w["key_sets"] for w in h.get("dask_workers", [])},
            "workers_say": {w: len(ks) for w, ks in held.items()}, "key_sets_total": len(names),
            "key_sets_on_two_workers": len(names) - len(set(names)), "key_replacements": h.get("key_replacements")}


def load(url: str, clients: int, requests: int, say, **kw) -> dict:
    say(f"  loadtest {clients} x {requests}")
    r = run_loadtest(url, clients, requests, "pneumoniamnist", MODEL, say=lambda m: None, **kw)
    say(f"    {r['completed']} answered, {r['errors']} errors {r['errors_by_kind'] or ''}, "
        f"{r['throughput_rps'] or 0:.2f} req/s, p95 {r['latency_p95_s'] or 0:.2f} s, re-uploads {r['key_reuploads']}, "
        f"answers differing {r['answers_differing']} of {r['answers_rechecked']}")
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--key-store-bytes", default="1GiB", help="each worker's key budget")
    ap.add_argument("--baseline-bytes", default="4GiB", help="the one-process baseline's key budget")
    ap.add_argument("--repeat", type=int, default=3, help="8 x 3 rounds against each service, alternated")
    ap.add_argument("--quick", action="store_true", help="smaller loads (16 clients instead of 32, 8 x 4 for the kill)")
    ap.add_argument("--out", default=str(OUT / "scaleout"))
    a = ap.parse_args()
    say = lambda m: print(m, flush=True)  # noqa: E731
    logs = Path(tempfile.mkdtemp(prefix="scaleout-"))
    result: dict = {"machine": machine_info(), "date": time.strftime("%Y-%m-%d"), "model": MODEL,
                    "workers": a.workers, "worker_key_store": a.key_store_bytes, "logs": str(logs)}
    many = 16 if a.quick else 32
    kill_requests = 4 if a.quick else 6

    say(f"baseline: one process, {a.baseline_bytes}; cluster: {a.workers} dask workers x {a.key_store_bytes}")
    base = Server("--key-store-bytes", a.baseline_bytes, log=logs / "serve-local.log")
    cluster = Cluster(a.workers, logs)
    svc = None
    try:
        svc = Server("--backend", "dask", "--scheduler", cluster.address, "--key-store-bytes", a.key_store_bytes,
                     log=logs / "serve-dask.log")
        result["service_start_s"] = svc.ready_s
        sampler = Sampler(cluster, svc.url)
        # 8 x 3 against each, alternated (this machine's speed drifts between runs): medians reported
        base_runs, dask_runs = [], []
        for k in range(a.repeat):
            say(f"round {k + 1} of {a.repeat}: one process, then the cluster")
            base_runs.append(load(base.url, 8, 3, say))
            dask_runs.append(load(svc.url, 8, 3, say))
        base.stop()
        base = None
        result["baseline_8x3_runs"], result["dask_8x3_runs"] = base_runs, dask_runs
        result["baseline_8x3"], result["dask_8x3"] = median_run(base_runs), median_run(dask_runs)
        result["dask_8x3_placement"] = sampler.placement()
        say(f"    fullest placement during the load {result['dask_8x3_placement']}")

        sampler.reset()
        result[f"dask_{many}x1"] = load(svc.url, many, 1, say)
        result[f"dask_{many}x1_placement"] = sampler.placement()
        result[f"dask_{many}x1_worker_rss_peak"] = dict(sampler.rss_peak)
        say(f"    worker RSS peaks (MiB) {[round(v / 2**20) for v in sampler.rss_peak.values()]}")

        # kill -9 the worker with the most key sets once a quarter of the predictions are answered
        kill: dict = {}
        total = 8 * kill_requests

        def killer() -> None:
            m0 = _answered(svc.url)
            while _answered(svc.url) - m0 < total // 4:
                time.sleep(0.2)
            h = health(svc.url)
            victim = max(h["dask_workers"], key=lambda w: w["key_sets"])
            pid = cluster.pids()[victim["worker"]]
            kill.update(worker=victim["worker"], key_sets=victim["key_sets"], answered_before=_answered(svc.url) - m0,
                        replacements_before=h["key_replacements"], at=time.time())
            os.kill(pid, signal.SIGKILL)
            say(f"    killed -9 {victim['worker']} (pid {pid}, {victim['key_sets']} key sets)")

        t = threading.Thread(target=killer, daemon=True)
        sampler.reset()
        t.start()
        result[f"dask_8x{kill_requests}_kill"] = load(svc.url, 8, kill_requests, say)
        t.join(timeout=5)
        after = placement(svc.url, cluster)  # its clients have gone: only the replacement count matters
        kill["replacements_after"] = after["key_replacements"]
        kill["placed_again"] = after["key_replacements"] - kill.get("replacements_before", 0)
        result["kill"] = {**kill, "placement_after": after, "fullest_placement": sampler.placement()}
        say(f"    key sets placed again: {kill['placed_again']}; placement {after}")

        # a worker added while 4 new clients generate their keys
        added: dict = {}
        before = set(cluster.pids())

        def adder() -> None:
            time.sleep(2.0)
            t0 = time.time()
            cluster.add_worker()
            while True:
                new = [w for w in cluster.pids() if w not in before]
                if new:
                    added.setdefault("joined_s", time.time() - t0)
                    st = cluster.states().get(new[0], {})
                    if isinstance(st, dict) and st.get("circuits"):
                        added.setdefault("circuits_s", time.time() - t0)
                        added["circuits"] = len(st["circuits"])
                    if isinstance(st, dict) and st.get("key_sets"):
                        added["first_key_set_s"] = time.time() - t0
                        added["worker"] = new[0]
                        return
                if time.time() - t0 > 300:
                    return
                time.sleep(0.25)

        t = threading.Thread(target=adder, daemon=True)
        sampler.reset()
        t.start()
        result["dask_4x2_add"] = load(svc.url, 4, 2, say)
        t.join(timeout=60)
        result["add"] = {**added, "fullest_placement": sampler.placement()}
        say(f"    added worker: {added}")
        result["worker_rss_peak"] = sampler.stop()
        result["health"] = health(svc.url)
        result["service_alive_at_end"] = svc.proc.poll() is None
    except Exception:
        if svc is not None and svc.proc.poll() is not None:
            say(f"the service exited with code {svc.proc.returncode}: {svc.log}")
        raise
    finally:
        if base is not None:
            base.stop()
        if svc is not None:
            svc.stop()
        cluster.stop()

    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    out.with_suffix(".md").write_text(report(result, many, kill_requests))
    say(f"wrote {out.with_suffix('.json')} and .md")
    return 0


def median_run(runs: list[dict]) -> dict:
    """The run whose throughput is the median (its own p50 and p95 with it)."""
    ranked = sorted(runs, key=lambda r: r["throughput_rps"] or 0.0)
    return ranked[len(ranked) // 2]


def _answered(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("engine_requests_total{") and 'route="/circuits/{cid}/predict"' in line
               and 'status="200"' in line)


def report(r: dict, many: int, kill_requests: int) -> str:
    ms = lambda v: "-" if v is None else f"{v:.2f} s"  # noqa: E731
    rps = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    b, d = r["baseline_8x3"], r["dask_8x3"]
    rows = [("one process, " + "4 GiB", "8 x 3", b), (f"{r['workers']} workers x {r['worker_key_store']}", "8 x 3", d),
            ("same", f"{many} x 1", r[f"dask_{many}x1"]), ("same, one worker killed -9", f"8 x {kill_requests}",
                                                            r[f"dask_8x{kill_requests}_kill"]),
            ("same, one worker added", "4 x 2", r["dask_4x2_add"])]
    lines = [f"# Scale out: {r['model']}, {r['date']}, {r['machine'].get('cpu', '')} "
             f"({r['machine'].get('cores', '?')} cores)", "",
             "Generated by `python bench/scaleout.py` (bench/results/scaleout.json).", "",
             "| service | clients x requests | errors | throughput (req/s) | p50 | p95 | key re-uploads | server reloads |",
             "|---|---|---|---|---|---|---|---|"]
    previous = 0
    for name, load_, x in rows:
        if name.startswith("one process"):
            reloads = x["server_key_reloads"]
        else:  # the cluster's counter runs over all its loads: each load's own share
            reloads, previous = x["server_key_reloads"] - previous, x["server_key_reloads"]
        x = {**x, "server_key_reloads": reloads}
        lines.append(f"| {name} | {load_} | {x['errors']} | {rps(x['throughput_rps'])} | {ms(x['latency_p50_s'])} | "
                     f"{ms(x['latency_p95_s'])} | {x['key_reuploads']} | {x['server_key_reloads']} |")
    p = r["dask_8x3_placement"]
    k = r["kill"]
    add = r["add"]
    rss = r.get(f"dask_{many}x1_worker_rss_peak", {})
    lines += ["", f"- 8 x 3, the fullest moment: key sets per worker as the service says "
                  f"{sorted(p.get('service_says', {}).values())}, as the workers say {sorted(p.get('workers_say', {}).values())}; "
                  f"key sets on two workers at once: {p.get('key_sets_on_two_workers')}.",
              f"- Throughput against one process (median of {len(r.get('dask_8x3_runs', [d]))} alternated rounds): "
              f"{d['throughput_rps'] / b['throughput_rps']:.0%}; p95 {d['latency_p95_s'] / b['latency_p95_s']:.2f}x. "
              f"Each round, one process: {', '.join(format(x['throughput_rps'], '.2f') for x in r.get('baseline_8x3_runs', [b]))} req/s; "
              f"the cluster: {', '.join(format(x['throughput_rps'], '.2f') for x in r.get('dask_8x3_runs', [d]))} req/s.",
              f"- {many} x 1: peak RSS per worker {', '.join(f'{v / 2**30:.2f} GiB' for v in rss.values())}.",
              f"- Kill -9 of {k.get('worker')} ({k.get('key_sets')} key sets) after {k.get('answered_before')} answers: "
              f"{k.get('placed_again')} key sets placed again.",
              f"- Worker added: joined after {ms(add.get('joined_s'))}, circuits after {ms(add.get('circuits_s'))}, "
              f"first key set after {ms(add.get('first_key_set_s'))}."]
    return "\n".join(line for line in lines if line is not None) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
