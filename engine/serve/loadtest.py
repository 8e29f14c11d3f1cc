"""Load test of a running service: N independent clients (own keys, own connection) sending M
encrypted predictions each, at the same time. Loopback or the project's own hosts only.

Each client downloads ``client.zip``, generates its keys (before the clock starts: a client's
key generation is its own machine's business), uploads its evaluation keys; once every client
has uploaded (or after ``barrier_s``, when the key store cannot hold every client at once), all
send their predictions, each one after another. Throughput counts the
predictions over that phase (uploads are timed apart, ``key_upload_s_median``; re-uploads after
an eviction happen inside the phase and are counted; ``server_key_reloads`` counts the key
sets the server loaded back from its key folder instead). A request that the service answers 404 (key evicted) or 429
(busy) is retried by the client as a user's would be; only requests that finally fail count as
errors. After the crowd, each client sends its first ciphertext again, alone, and compares the
decrypted answers: ``answers_differing`` counts those a crowd changed (Concrete computes the
same result for the same ciphertext and keys). ``server_rss_peak_bytes`` is the highest ``engine_process_rss_bytes`` read from
``/metrics`` while the clients run.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .client import EncryptedClient, ServiceUnavailable

from .transports import HTTPTransport
from ..learn.data import load_samples
from ..learn.features import remote_features


def _circuit_for(transport: HTTPTransport, dataset: str | None, model: str | None) -> dict:
    listed = transport.circuits()
    for c in listed:
        if (dataset is None or c["dataset"] == dataset) and (model is None or c["model"] == model) \
                and c.get("batch_size", 1) == 1:  # one image per request (not a batched twin)
            return c
    raise ServiceUnavailable(f"no circuit for dataset={dataset} model={model} at {transport.describe()}")


@dataclass
class Tally:
    """What the clients saw, gathered under one lock: each answer's latency and stages, each
    client's first answer and prediction phase, key uploads, errors by kind."""

    latencies: list[float] = field(default_factory=list)
    stages: list[dict] = field(default_factory=list)  # each answer's queue and server seconds (as the service reports them)
    spans: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each client's prediction phase
    first: list[float] = field(default_factory=list)
    uploads: list[float] = field(default_factory=list)
    firsts: dict[int, tuple] = field(default_factory=dict)  # client -> (logits, exchange) of its first answer
    errors: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, k: int, r: int, dt: float, logits, ex) -> None:
        with self.lock:
            self.latencies.append(dt)
            self.stages.append(ex.stages)
            if r == 0:
                self.first.append(dt)
                self.firsts[k] = (logits, ex)

    def error(self, kind: str, n: int = 1) -> None:
        with self.lock:
            self.errors[kind] += n

    def add(self, what: list, value) -> None:
        with self.lock:
            what.append(value)


class PeakMemory:
    """The service's highest ``engine_process_rss_bytes`` while the block runs (read every 0.5 s)."""

    def __init__(self, transport: Callable[[], HTTPTransport]):
        self._transport, self.peak = transport, 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        m = self._transport()
        while not self._done.is_set():
            try:
                self.peak = max(self.peak, m.metrics().get("engine_process_rss_bytes", 0.0))
            except Exception:  # noqa: BLE001 - the figure is best effort
                pass
            self._done.wait(0.5)
        m.close()

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._done.set()
        self._thread.join(timeout=5)


def client_loop(k: int, c: EncryptedClient, x: np.ndarray, requests: int, start_line: threading.Barrier,
                barrier_s: float, tally: Tally) -> None:
    """One client: upload its keys, wait for the others, send its ``requests`` one after another."""
    try:
        t0 = time.perf_counter()
        c.register()
        tally.add(tally.uploads, time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - counted
        tally.error(f"upload: {type(exc).__name__}", requests)
        start_line.abort()
        return
    try:  # everyone's keys are up: the predictions start together. A key store too small
        start_line.wait(timeout=barrier_s)  # for every client breaks the line after barrier_s
    except threading.BrokenBarrierError:
        pass
    begin = time.perf_counter()
    for r in range(requests):
        img = x[(k * requests + r) % len(x)][None]
        t0 = time.perf_counter()
        try:
            logits, ex = c.predict(img)
        except Exception as exc:  # noqa: BLE001 - counted
            tally.error(f"{type(exc).__name__}: {str(exc)[:80]}")
            continue
        tally.answer(k, r, time.perf_counter() - t0, logits, ex)
    tally.add(tally.spans, (begin, time.perf_counter()))


def recheck(made: list[EncryptedClient], firsts: dict[int, tuple]) -> tuple[int, int]:
    """Each client's first ciphertext sent again, alone: (answers that differ, answers not rechecked)."""
    differing, unchecked = 0, 0
    for k, (logits, ex) in sorted(firsts.items()):
        try:
            differing += not np.array_equal(made[k].rerun(ex), logits)
        except Exception:  # noqa: BLE001 - counted apart: not a wrong answer
            unchecked += 1
    return differing, unchecked


def run_loadtest(url: str, clients: int, requests: int, dataset: str | None = "pneumoniamnist",
                 model: str | None = None, say: Callable[[str], None] = lambda _m: None,
                 max_seconds: float = 1800.0, barrier_s: float = 30.0, token: str | None = None,
                 ca_file: str | None = None) -> dict:
    if clients < 1 or requests < 1:
        raise ValueError("--clients and --requests must be at least 1")

    def transport() -> HTTPTransport:
        return HTTPTransport(url, token=token, ca_file=ca_file)

    probe = transport()
    circuit = _circuit_for(probe, dataset, model)
    x = remote_features(load_samples(circuit["dataset"]).images, circuit)  # the client's own feature stage
    folder = Path(tempfile.mkdtemp(prefix="loadtest-"))

    say(f"{clients} client(s): downloading client.zip and generating keys")
    made, keygen_s = [], []
    for _k in range(clients):
        c = EncryptedClient.download(transport(), circuit["id"], folder, keep_evaluation_keys=True,
                                     max_wait_s=max_seconds)
        keygen_s.append(c.fhe.keygen())
        made.append(c)

    tally, start_line = Tally(), threading.Barrier(clients)
    say(f"{clients} client(s) x {requests} request(s): running")
    with PeakMemory(transport) as memory:
        threads = [threading.Thread(target=client_loop, args=(k, c, x, requests, start_line, barrier_s, tally))
                   for k, c in enumerate(made)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(1.0, max_seconds - (time.perf_counter() - start)))
        wall = time.perf_counter() - start
    try:
        metrics = probe.metrics()
    except ServiceUnavailable:  # the service is gone: the report says what the clients saw
        metrics = {}
    say(f"re-sending {len(tally.firsts)} first request(s) one at a time (a crowd must not change an answer)")
    differing, unchecked = recheck(made, tally.firsts)
    for c in made:
        c.close()
        c.transport.close()
    reuploads = sum(max(0, c.uploads - 1) for c in made)  # keys evicted and sent again
    return {"url": url, "circuit": circuit["id"], "dataset": circuit["dataset"], "model": circuit["model"],
            "clients": clients, "requests": requests, **_figures(tally), "key_reuploads": int(reuploads),
            "answers_rechecked": len(tally.firsts) - unchecked, "answers_differing": int(differing),
            "keygen_s_median": float(np.median(keygen_s)), "wall_s": wall,
            **_server_figures(metrics, memory.peak)}


def _figures(t: Tally) -> dict:
    lat = np.asarray(t.latencies)
    predict_wall = (max(e for _, e in t.spans) - min(b for b, _ in t.spans)) if t.spans else 0.0
    return {
        "completed": int(len(lat)), "errors": int(sum(t.errors.values())), "errors_by_kind": dict(t.errors),
        "latency_p50_s": float(np.percentile(lat, 50)) if len(lat) else None,
        "latency_p95_s": float(np.percentile(lat, 95)) if len(lat) else None,
        "latency_max_s": float(lat.max()) if len(lat) else None,
        "throughput_rps": float(len(lat) / predict_wall) if predict_wall else None,
        "queue_s_median": float(np.median([st["queue_s"] for st in t.stages])) if t.stages else None,
        "server_s_median": float(np.median([st["server_s"] for st in t.stages])) if t.stages else None,
        "server_s_p95": float(np.percentile([st["server_s"] for st in t.stages], 95)) if t.stages else None,
        "first_request_latency_s": float(np.median(t.first)) if t.first else None,
        "later_request_latency_s": (float(np.median(lat[np.isin(lat, t.first, invert=True)]))
                                    if len(lat) > len(t.first) else None),
        "key_upload_s_median": float(np.median(t.uploads)) if t.uploads else None,
    }


def _server_figures(metrics: dict, peak_rss: float) -> dict:
    return {
        "server_rss_peak_bytes": int(max(peak_rss, metrics.get("engine_process_rss_bytes", 0.0))),
        "server_key_store_capacity_bytes": int(metrics.get("engine_key_store_capacity_bytes", 0)),
        "server_key_store_evictions": int(metrics.get("engine_key_store_evictions", 0)),
        "server_key_reloads": int(metrics.get("engine_key_reloads", 0)),
        "server_key_reload_s_median": float(metrics.get("engine_key_reload_seconds_median", 0.0)),
    }


def rechecked(r: dict) -> str:
    """"k of n" re-sent answers that differed ("-" for a run from before the check)."""
    return f"{r['answers_differing']} of {r['answers_rechecked']}" if "answers_rechecked" in r else "-"


def markdown(runs: list[dict]) -> str:
    """A table of load-test runs (the JSON of each ``loadtest --json``)."""
    ms = lambda v: "-" if v is None else f"{1000 * v:.0f} ms"  # noqa: E731
    lines = ["| clients x requests | key store | errors | p50 | p95 | max | throughput | first request | "
             "later requests | key re-uploads | server reloads | server RSS peak | re-sent answers differing |", "|" + " --- |" * 13]
    for r in runs:
        lines.append(
            f"| {r['clients']} x {r['requests']} | {r['server_key_store_capacity_bytes'] / 2**30:.2f} GiB | {r['errors']} | "
            f"{ms(r['latency_p50_s'])} | {ms(r['latency_p95_s'])} | {ms(r['latency_max_s'])} | "
            f"{'-' if r['throughput_rps'] is None else format(r['throughput_rps'], '.2f')} req/s | {ms(r['first_request_latency_s'])} | {ms(r['later_request_latency_s'])} | "
            f"{r['key_reuploads']} | {r.get('server_key_reloads', '-')} | {r['server_rss_peak_bytes'] / 2**20:.0f} MiB | "
            f"{rechecked(r)} |")
    return "\n".join(lines) + "\n"
