"""What p95 any key-store schedule could reach in issue 19's 1 GiB load (a model, not a measurement).

    python bench/tenants_bound.py            # costs from bench/results/tenants.json
    python bench/tenants_bound.py --run-s 0.59 --reload-s 2.0

An event model of ``loadtest --clients 8 --requests 3``: 2 workers, ``slots`` key sets in memory
(1 GiB holds 3 of the shipped circuit's, about 281 MB each measured), each client sending its
requests one after another. A run costs ``run_s`` (one core, another run beside it) or
``alone_s`` (both cores); a run whose keys are not in memory first costs ``reload_s`` more and
evicts the least recently used idle key set that has been idle ``linger`` seconds. The key sets
of the last clients to upload start in memory, as in the service. Two orders: first come first
served, and ready keys first.

The costs come from the report's own runs: ``run_s`` is the median server time of the 4 GiB run
(no reloads), ``reload_s`` the service's median reload time (reading, deserializing, first run)
minus a run. The model is checked against the 4 GiB run (8 slots: nothing reloads) before it is
used for 1 GiB. It leaves out the clients' own work on the same cores, so it errs on the
optimistic side.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def simulate(slots: int, run_s: float, alone_s: float, reload_s: float, think_s: float = 0.06,
             linger: float = 0.3, order: str = "fifo", clients: int = 8, requests: int = 3,
             workers: int = 2) -> dict:
    t = 0.0
    due = {c: 0.0 for c in range(clients)}  # when the client's next request arrives (None: none now)
    answered = {c: 0 for c in range(clients)}
    in_memory = {c: -1e9 for c in range(max(0, clients - slots), clients)}  # client -> last used
    queue: list[tuple[float, int]] = []
    running: list[tuple[float, int, int, float]] = []  # (end, seq, client, arrival)
    seq, latencies, reloads = itertools.count(), [], 0
    while True:
        for c, at in due.items():
            if at is not None and at <= t + 1e-12:
                queue.append((at, c))
                due[c] = None
        while len(running) < workers:
            busy = {r[2] for r in running}
            waiting = sorted(q for q in queue if q[1] not in busy)
            if order == "ready-first":
                waiting.sort(key=lambda q: (q[1] not in in_memory, q[0]))
            chosen = None
            for arrival, c in waiting:
                cost = run_s if running or len(queue) > 1 else alone_s
                if c not in in_memory:
                    if len(in_memory) >= slots:
                        idle = [k for k, used in in_memory.items() if k not in busy
                                and all(q[1] != k for q in queue) and t - used >= linger]
                        if not idle:
                            continue
                        del in_memory[min(idle, key=in_memory.get)]
                    cost += reload_s
                    reloads += 1
                chosen = (arrival, c, cost)
                break
            if chosen is None:
                break
            arrival, c, cost = chosen
            queue.remove((arrival, c))
            in_memory[c] = t
            heapq.heappush(running, (t + cost, next(seq), c, arrival))
        upcoming = [r[0] for r in running] + [at for at in due.values() if at is not None]
        upcoming += [used + linger for used in in_memory.values() if used + linger > t]
        if not upcoming:
            break
        t = min(upcoming)
        while running and running[0][0] <= t + 1e-12:
            end, _, c, arrival = heapq.heappop(running)
            latencies.append(end - arrival)
            in_memory[c] = end
            answered[c] += 1
            due[c] = end + think_s if answered[c] < requests else None
    lat = np.asarray(latencies)
    return {"p50_s": float(np.percentile(lat, 50)), "p95_s": float(np.percentile(lat, 95)),
            "throughput_rps": len(lat) / t, "reloads": reloads, "answers": len(lat)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", default=str(REPO / "bench" / "results" / "tenants.json"))
    ap.add_argument("--run-s", type=float, help="one run on one core (default: the 4 GiB run's median server time)")
    ap.add_argument("--alone-s", type=float, default=0.33, help="one run alone on both cores")
    ap.add_argument("--reload-s", type=float, help="a reload's cost on top of a run (default: from the report)")
    a = ap.parse_args()
    load = json.loads(Path(a.report).read_text()).get("load", {}) if Path(a.report).exists() else {}
    four, one = load.get("c8_4gib", {}), load.get("c8_1gib", {})
    run_s = a.run_s or four.get("server_s_median")
    reload_s = a.reload_s or (one.get("server_key_reload_s_median", 0) - run_s if run_s else None)
    if not run_s or not reload_s or reload_s <= 0:
        ap.error("no costs in the report (run bench/tenants_report.py --only load): give --run-s and --reload-s")
    print(f"costs: a run {run_s:.2f} s on one core, {a.alone_s:.2f} s alone; a reload {reload_s:.2f} s more")
    check = simulate(8, run_s, a.alone_s, reload_s)
    if four:
        print(f"check, 4 GiB (8 key sets fit): model p95 {check['p95_s']:.2f} s, {check['throughput_rps']:.2f} req/s; "
              f"measured p95 {four['latency_p95_s']:.2f} s, {four['throughput_rps']:.2f} req/s")
    print("\n| key sets in memory | order | linger | p50 | p95 | throughput | reloads |\n|---|---|---|---|---|---|---|")
    for slots in (3, 4, 5, 6):
        for order in ("fifo", "ready-first"):
            for linger in (0.0, 0.3, 1.0):
                r = simulate(slots, run_s, a.alone_s, reload_s, linger=linger, order=order)
                print(f"| {slots} | {order} | {linger:g} s | {r['p50_s']:.2f} s | {r['p95_s']:.2f} s | "
                      f"{r['throughput_rps']:.2f} req/s | {r['reloads']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
