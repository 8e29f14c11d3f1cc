"""The service: serve, loadtest, token."""

from __future__ import annotations

import sys
from pathlib import Path

from ..config import ServiceConfig
from .args import UserError, byte_size, say, tenant_args


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run the encrypted-inference HTTP service for every saved model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--models-dir", default=None, help="model registry (default: $ENGINE_MODELS_DIR, else ./models)")
    p.add_argument("--cache-dir", default=None, help="circuit cache (default: $ENGINE_CACHE_DIR, else ./.cache)")
    p.add_argument("--key-store-bytes", type=byte_size, default=ServiceConfig.key_store_bytes,
                   help="memory bound of the registered key sets, e.g. 1GiB or 1073741824 (default 4GiB)")
    p.add_argument("--key-dir", default=None,
                   help="keep every registered key set serialized in this folder, across restarts "
                        "(default: a temporary folder removed at exit)")
    p.add_argument("--key-disk-bytes", type=byte_size, default=ServiceConfig.key_disk_bytes,
                   help="bound of the serialized key sets kept (default 16GiB); past it the least recently used go")
    p.add_argument("--key-linger", type=float, default=ServiceConfig.key_linger_s,
                   help="seconds a key set just used stays in memory while others wait for room (its client's "
                        f"next request comes; default {ServiceConfig.key_linger_s:g})")
    p.add_argument("--key-ttl", type=float, default=0.0, help="drop key sets idle this many seconds from memory (0: never)")
    p.add_argument("--workers", type=int, default=0,
                   help="FHE runs in flight (default 0: one per core; a lone run spreads over every core, "
                        "runs side by side use one core each)")
    p.add_argument("--max-queue", type=int, default=64, help="runs waiting before the service answers 429")
    p.add_argument("--backend", choices=["local", "dask"], default="local")
    p.add_argument("--scheduler", default="", help="dask scheduler address for --backend dask")
    p.add_argument("--dask-tls-ca", default="", help="TLS to the Dask cluster (tls://...): the CA (PEM)")
    p.add_argument("--dask-tls-cert", default="", help="this service's certificate for the Dask cluster (PEM)")
    p.add_argument("--dask-tls-key", default="", help="that certificate's private key (PEM)")
    p.add_argument("--first", default="", metavar="DATASETS",
                   help="host these datasets' circuits first (comma-separated): their clients are answered while "
                        "the others load")
    p.add_argument("--batch-size", type=int, default=1,
                   help="also serve each model for this many images per request (same keys; local backend)")
    g = p.add_argument_group("tenants (python -m engine token --tokens FILE NAME makes a token)")
    g.add_argument("--tokens", default=None,
                   help="tokens file: every route but /health and /metrics then needs Authorization: Bearer TOKEN")
    g.add_argument("--insecure-open", action="store_true",
                   help="listen beyond loopback without --tokens (anyone who reaches the port may use the service)")
    g.add_argument("--max-key-sets", type=int, default=0, help="key sets per tenant unless its token says (0: no limit)")
    g.add_argument("--rps", type=float, default=0.0, help="requests per second per tenant unless its token says (0: no limit)")
    g.add_argument("--audit-log", default=None, help="one JSON line per request (no payloads, keys or tokens), rotated")
    g.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate (PEM)")
    g.add_argument("--ssl-keyfile", default=None, help="the certificate's private key (PEM)")


def cmd_serve(a) -> int:
    import faulthandler

    from ..serve.api import serve

    faulthandler.enable()  # a crash in native code (Concrete's runtime) leaves its Python stack in the log

    cfg = ServiceConfig(models_dir=a.models_dir or "", cache_dir=a.cache_dir or "", key_store_bytes=a.key_store_bytes,
                        key_dir=a.key_dir or "", key_disk_bytes=a.key_disk_bytes, key_ttl_s=a.key_ttl,
                        key_linger_s=a.key_linger,
                        workers=a.workers, max_queue=a.max_queue, backend=a.backend,
                        scheduler=a.scheduler, batch_size=a.batch_size, first=a.first,
                        dask_tls_ca=a.dask_tls_ca, dask_tls_cert=a.dask_tls_cert, dask_tls_key=a.dask_tls_key)
    import ipaddress

    from ..serve.tenants import Tenants, audit_logger, read_tokens

    try:
        loopback = a.host == "localhost" or ipaddress.ip_address(a.host).is_loopback
    except ValueError:
        loopback = False
    if not a.tokens and not loopback and not a.insecure_open:
        raise UserError(f"refusing to listen on {a.host} without --tokens: anyone who reaches the port could use the "
                        "service; give --tokens FILE (or --insecure-open)")
    if bool(a.ssl_certfile) != bool(a.ssl_keyfile):
        raise UserError("--ssl-certfile and --ssl-keyfile go together")
    for f in (a.ssl_certfile, a.ssl_keyfile):
        if f and not Path(f).exists():
            raise UserError(f"{f} does not exist")
    tenants = Tenants(read_tokens(Path(a.tokens)) if a.tokens else None, a.max_key_sets, a.rps)
    serve(cfg, a.host, a.port, say=say, tenants=tenants, audit=audit_logger(Path(a.audit_log)) if a.audit_log else None,
          ssl_certfile=a.ssl_certfile, ssl_keyfile=a.ssl_keyfile)
    return 0


def add_token(sub) -> None:
    p = sub.add_parser("token", help="create a tenant's token for serve --tokens (prints it once)")
    p.add_argument("--tokens", required=True, help="the tokens file (created if missing; stores only each token's hash)")
    p.add_argument("name", help="the tenant's name (letters, digits, '-', '_', '.')")
    p.add_argument("--max-key-sets", type=int, default=0, help="this tenant's key sets at most (0: the service's default)")
    p.add_argument("--rps", type=float, default=0.0, help="this tenant's requests per second (0: the service's default)")


def cmd_token(a) -> int:
    from ..serve.tenants import add_token as create

    token = create(Path(a.tokens), a.name, a.max_key_sets, a.rps)
    print(f"token for '{a.name}' (only its SHA-256 is stored in {a.tokens}; keep it secret):", file=sys.stderr)
    print(token)
    return 0


def add_loadtest(sub) -> None:
    p = sub.add_parser("loadtest", help="N concurrent clients with their own keys against a running service")
    p.add_argument("--server", required=True, help="service URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=5, help="encrypted predictions per client")
    p.add_argument("--dataset", default="pneumoniamnist")
    p.add_argument("--model", default=None)
    p.add_argument("--json", default=None, help="write the figures to this file")
    tenant_args(p)


def cmd_loadtest(a) -> int:
    from ..study.evaluate import write_json
    from ..serve.loadtest import run_loadtest

    r = run_loadtest(a.server, a.clients, a.requests, a.dataset, a.model, say=say, token=a.token, ca_file=a.ca_file)
    ms = lambda v: "-" if v is None else f"{1000 * v:.0f} ms"  # noqa: E731
    num = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731 - every request may have failed
    print(f"{r['clients']} clients x {r['requests']} requests: {r['completed']} answered, {r['errors']} errors, "
          f"p50 {ms(r['latency_p50_s'])}, p95 {ms(r['latency_p95_s'])}, max {ms(r['latency_max_s'])}, "
          f"{num(r['throughput_rps'], '.2f')} req/s, first request {ms(r['first_request_latency_s'])}, "
          f"key re-uploads {r['key_reuploads']}, server RSS peak "
          f"{num(None if r['server_rss_peak_bytes'] is None else r['server_rss_peak_bytes'] / 2**20, '.0f')} MiB")
    print(f"answers re-sent alone: {r['answers_differing']} of {r['answers_rechecked']} differ")
    for kind, n in sorted(r["errors_by_kind"].items(), key=lambda kv: -kv[1]):  # what failed, most first
        print(f"  {n} failed: {kind}")
    if a.json:
        write_json(r, Path(a.json))
        print(f"wrote {a.json}")
    return 0 if r["errors"] == 0 and r["answers_differing"] == 0 else 1


COMMANDS = {"serve": (add_serve, cmd_serve), "loadtest": (add_loadtest, cmd_loadtest), "token": (add_token, cmd_token)}
