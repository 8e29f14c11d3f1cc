"""The service: serve, loadtest."""

from __future__ import annotations

from pathlib import Path

from ..config import ServiceConfig
from .args import byte_size, say


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run the encrypted-inference HTTP service for every saved model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--models-dir", default=None, help="model registry (default: $ENGINE_MODELS_DIR, else ./models)")
    p.add_argument("--cache-dir", default=None, help="circuit cache (default: $ENGINE_CACHE_DIR, else ./.cache)")
    p.add_argument("--key-store-bytes", type=byte_size, default=ServiceConfig.key_store_bytes,
                   help="memory bound of the registered key sets, e.g. 1GiB or 1073741824 (default 4GiB)")
    p.add_argument("--key-ttl", type=float, default=0.0, help="drop key sets idle this many seconds (0: never)")
    p.add_argument("--workers", type=int, default=0,
                   help="FHE runs in flight (default 0: one per core; a lone run spreads over every core, "
                        "runs side by side use one core each)")
    p.add_argument("--max-queue", type=int, default=64, help="runs waiting before the service answers 429")
    p.add_argument("--backend", choices=["local", "dask"], default="local")
    p.add_argument("--scheduler", default="", help="dask scheduler address for --backend dask")
    p.add_argument("--batch-size", type=int, default=1,
                   help="also serve each model for this many images per request (same keys; local backend)")


def cmd_serve(a) -> int:
    from ..serve.api import serve

    cfg = ServiceConfig(models_dir=a.models_dir or "", cache_dir=a.cache_dir or "", key_store_bytes=a.key_store_bytes,
                        key_ttl_s=a.key_ttl, workers=a.workers, max_queue=a.max_queue, backend=a.backend,
                        scheduler=a.scheduler, batch_size=a.batch_size)
    serve(cfg, a.host, a.port, say=say)
    return 0


def add_loadtest(sub) -> None:
    p = sub.add_parser("loadtest", help="N concurrent clients with their own keys against a running service")
    p.add_argument("--server", required=True, help="service URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=5, help="encrypted predictions per client")
    p.add_argument("--dataset", default="pneumoniamnist")
    p.add_argument("--model", default=None)
    p.add_argument("--json", default=None, help="write the figures to this file")


def cmd_loadtest(a) -> int:
    from ..study.evaluate import write_json
    from ..serve.loadtest import run_loadtest

    r = run_loadtest(a.server, a.clients, a.requests, a.dataset, a.model, say=say)
    ms = lambda v: "-" if v is None else f"{1000 * v:.0f} ms"  # noqa: E731
    print(f"{r['clients']} clients x {r['requests']} requests: {r['completed']} answered, {r['errors']} errors, "
          f"p50 {ms(r['latency_p50_s'])}, p95 {ms(r['latency_p95_s'])}, max {ms(r['latency_max_s'])}, "
          f"{r['throughput_rps']:.2f} req/s, first request {ms(r['first_request_latency_s'])}, "
          f"key re-uploads {r['key_reuploads']}, server RSS peak {r['server_rss_peak_bytes'] / 2**20:.0f} MiB")
    if a.json:
        write_json(r, Path(a.json))
        print(f"wrote {a.json}")
    return 0 if r["errors"] == 0 else 1


COMMANDS = {"serve": (add_serve, cmd_serve), "loadtest": (add_loadtest, cmd_loadtest)}
