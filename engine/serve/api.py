"""HTTP in front of :class:`engine.serve.hosting.Service` (FastAPI + uvicorn), with Prometheus metrics.

``python -m engine serve`` runs it. Binary bodies are ``application/octet-stream``; errors are
``{"error": "..."}`` with a 4xx status; ``/health`` answers 200 only once every circuit is
loaded and warmed. With tokens (:mod:`engine.serve.tenants`) every route but ``/health`` and
``/metrics`` needs ``Authorization: Bearer TOKEN`` (401 otherwise), a key set answers only to
the tenant that uploaded it (404 to any other), and each tenant's key sets and requests per
second are bounded (429 with ``Retry-After``). ``--audit-log`` writes one JSON line per request.
``/openapi.json`` is the schema and ``/docs`` a page built from it that loads nothing from
elsewhere. The core engine never imports this module.
"""

from __future__ import annotations

import html
import json
import statistics
import sys
import threading
import time
import traceback
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool

from ..config import ServiceConfig
from .errors import Busy, NotFound, ServiceError, TooLarge
from .hosting import Service
from .tenants import Tenant, Tenants

OPEN_ROUTES = ("/health", "/metrics")  # answered without a token

OCTET = "application/octet-stream"


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message.splitlines()[0][:300] if message else "error"}, status, headers=headers)


class Metrics:
    def __init__(self, service: Service):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("engine_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        # tenant names come from the tokens file (plus "-" without tokens, "unauthenticated"):
        # the label's cardinality is bounded by the operator, never by callers
        self.tenant_requests = Counter("engine_tenant_requests", "HTTP requests by tenant and status",
                                       ["tenant", "status"], registry=r)
        self.tenant_fhe_seconds = Counter("engine_tenant_fhe_seconds", "FHE run time by tenant", ["tenant"], registry=r)
        self.predictions = Counter("engine_predict_requests", "predict requests (any status)", registry=r)
        self.latency = Histogram("engine_request_seconds", "request latency by route", ["route"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10, 30, 60))
        self.fhe_seconds = Histogram("engine_fhe_run_seconds", "FHE circuit run time", registry=r,
                                     buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5))
        self.queue_seconds = Histogram("engine_queue_wait_seconds", "time a run waited in the queue", registry=r,
                                       buckets=(0.001, 0.01, 0.1, 0.5, 1, 2, 5, 10, 30))
        Gauge("engine_queue_depth", "FHE runs waiting", registry=r).set_function(lambda: service.pool.depth)
        Gauge("engine_runs_in_flight", "FHE runs executing", registry=r).set_function(lambda: service.pool.running)
        Gauge("engine_key_store_bytes", "memory held by registered key sets", registry=r).set_function(
            lambda: service.store.used_bytes)
        Gauge("engine_key_store_capacity_bytes", "key store bound", registry=r).set_function(lambda: service.store.capacity)
        Gauge("engine_key_store_entries", "registered key sets", registry=r).set_function(lambda: len(service.store))
        Gauge("engine_key_store_evictions", "key sets evicted so far", registry=r).set_function(
            lambda: service.store.evictions)
        Gauge("engine_key_dir_bytes", "serialized key sets kept (memory or disk)", registry=r).set_function(
            lambda: service.vault.used_bytes)
        Gauge("engine_key_dir_entries", "serialized key sets kept", registry=r).set_function(lambda: len(service.vault))
        Gauge("engine_key_dir_discarded", "key files found partial or corrupt and discarded", registry=r).set_function(
            lambda: service.vault.discarded)
        Gauge("engine_key_reloads", "key sets loaded into memory from the key folder", registry=r).set_function(
            lambda: service.reloads)
        Gauge("engine_key_reload_seconds_median", "median cold run: reading, deserializing, preparing, running",
              registry=r).set_function(lambda: float(statistics.median(service.reload_seconds)) if service.reload_seconds else 0.0)
        Gauge("engine_process_rss_bytes", "resident memory of the service process", registry=r).set_function(
            lambda: service.stats()["rss_bytes"])
        Gauge("engine_key_replacements", "key sets placed again after their Dask worker left", registry=r).set_function(
            lambda: service.replacements)
        r.register(_WorkerCollector(service))


class _WorkerCollector:
    """``engine_worker_*{worker=...}``: what each Dask worker holds and has run (read at each scrape;
    the label's values are the cluster's worker addresses, bounded by the operator)."""

    def __init__(self, service: Service):
        self.service = service

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        sets = GaugeMetricFamily("engine_worker_key_sets", "key sets placed on each Dask worker", labels=["worker"])
        size = GaugeMetricFamily("engine_worker_key_bytes", "memory of the key sets on each Dask worker", labels=["worker"])
        runs = GaugeMetricFamily("engine_worker_runs", "FHE runs finished on each Dask worker so far", labels=["worker"])
        for w in self.service.workers():
            sets.add_metric([w["worker"]], w["key_sets"])
            size.add_metric([w["worker"]], w["key_bytes"])
            runs.add_metric([w["worker"]], w["runs"])
        yield from (sets, size, runs)


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything past ``limit`` bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"body of {int(declared):,} bytes exceeds the limit of {limit:,}")
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            raise TooLarge(f"body exceeds the limit of {limit:,} bytes")
        body += chunk
    return bytes(body)


def create_app(service: Service, load: bool = True, say: Callable[[str], None] = lambda _m: None,
               tenants: Tenants | None = None, audit=None) -> FastAPI:
    """The FastAPI app; with ``load`` the circuits load in the background (``/health`` says when).
    ``tenants``: tokens, quotas and key ownership (default: no tokens, no limits); ``audit``: a
    logger that gets one JSON line per request."""
    state = {"error": None}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if load:
            import anyio.to_thread

            anyio.to_thread.current_default_thread_limiter().total_tokens = max(100, 2 * service.pool.max_queue)
            threading.Thread(target=_load_circuits, args=(service, state, say), name="load-circuits", daemon=True).start()
        yield

    app = FastAPI(title="Encrypted MedMNIST inference", docs_url=None, redoc_url=None, lifespan=lifespan,
                  description="Encrypted-inference service: circuits, evaluation keys and ciphertexts only.")
    metrics = Metrics(service)
    app.state.service = service
    tenants = tenants or Tenants(None)
    tenants.owner_of = service.owner_of
    tenants.count_of = service.key_sets_of
    # one middleware per concern; the last added runs first: metrics, then the audit log, then
    # tokens and rate limits, then a 500 for anything the route raised
    app.middleware("http")(_internal_errors)
    app.middleware("http")(_authentication(tenants))
    if audit is not None:
        app.middleware("http")(_audit_log(audit))
    app.middleware("http")(_request_metrics(metrics))
    _error_handlers(app)
    _info_routes(app, service, metrics, state)
    _key_routes(app, service, tenants, metrics)
    return app


def _load_circuits(service: Service, state: dict, say: Callable[[str], None]) -> None:
    try:
        service.load(say)
        say(f"ready: {len(service.circuits)} circuit(s)")
    except Exception as exc:  # noqa: BLE001 - reported by /health
        state["error"] = f"{type(exc).__name__}: {exc}"
        say(f"loading failed: {state['error']}\n{traceback.format_exc()}")


def _route_of(request: Request) -> str:
    return getattr(request.scope.get("route"), "path", "unmatched")


def _tenant_name(request: Request) -> str | None:
    """Who sent the request: its tenant, "unauthenticated" without a valid token, None on an open route."""
    return getattr(request.state, "tenant_name", None)


def _authentication(tenants: Tenants):
    async def authenticate(request: Request, call_next):
        """Every route but the open ones needs a known token (401), within its tenant's request rate (429)."""
        if request.url.path in OPEN_ROUTES:
            return await call_next(request)
        tenant = tenants.authenticate(request.headers.get("authorization"))
        if tenant is None:
            request.state.tenant_name = "unauthenticated"
            return _error(401, "missing or unknown token: send Authorization: Bearer TOKEN", {"WWW-Authenticate": "Bearer"})
        request.state.tenant, request.state.tenant_name = tenant, tenant.name
        if (wait := tenants.limit(tenant)) > 0:
            return _error(429, f"tenant '{tenant.name}' is over its request rate",
                          {"Retry-After": str(max(1, round(wait + 0.5)))})
        return await call_next(request)
    return authenticate


def _request_metrics(metrics: Metrics):
    async def observe(request: Request, call_next):
        """Requests by route, status and tenant, their latency, the tenants' FHE time."""
        start = time.perf_counter()
        response = await call_next(request)
        path, status = _route_of(request), str(response.status_code)
        metrics.requests.labels(path, status).inc()
        metrics.latency.labels(path).observe(time.perf_counter() - start)
        name = _tenant_name(request)
        if name is not None:
            metrics.tenant_requests.labels(name, status).inc()
            server_s = float(response.headers.get("x-server-seconds", 0) or 0)
            if server_s:
                metrics.tenant_fhe_seconds.labels(name).inc(server_s)
        if path.endswith("/predict"):
            metrics.predictions.inc()
        return response
    return observe


def _audit_log(audit):
    async def log(request: Request, call_next):
        """One JSON line per request: who, what, how large, how long (never a body)."""
        start = time.perf_counter()
        response = await call_next(request)
        params = request.scope.get("path_params") or {}
        audit.info(json.dumps({
            "time": round(time.time(), 3), "tenant": _tenant_name(request), "method": request.method,
            "route": _route_of(request), "circuit": params.get("cid"), "status": response.status_code,
            "bytes_in": int(request.headers.get("content-length") or 0),
            "bytes_out": int(response.headers.get("content-length") or 0),
            "queue_s": float(response.headers.get("x-queue-seconds", 0) or 0),
            "server_s": float(response.headers.get("x-server-seconds", 0) or 0),
            "seconds": round(time.perf_counter() - start, 6)}))
        return response
    return log


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError):
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if isinstance(exc, Busy) else None
        return _error(exc.status, str(exc), headers)

    @app.exception_handler(404)
    async def _not_found(_request: Request, _exc):
        return _error(404, "no such route")

    @app.exception_handler(405)
    async def _bad_method(_request: Request, _exc):
        return _error(405, "method not allowed")


def _info_routes(app: FastAPI, service: Service, metrics: Metrics, state: dict) -> None:
    @app.get("/health")
    async def health():
        if state["error"]:
            return JSONResponse({"status": "error", "error": state["error"]}, 503)
        if not service.ready:
            return JSONResponse({"status": "starting", "circuits": len(service.circuits), "step": service.step,
                                 "hosted": [{"id": c.id, "dataset": c.dataset, "model": c.model}
                                            for c in list(service.circuits.values())]}, 503)
        answer = {"status": "ok", "circuits": len(service.circuits), "backend": service.config.backend,
                  "workers": service.pool.workers, "uptime_s": round(time.time() - service.started, 1)}
        if service.config.backend == "dask":  # each Dask worker and the key sets it holds
            answer["dask_workers"] = service.workers()
            answer["key_replacements"] = service.replacements
            answer["orphans_dropped"] = service.runner.orphans_dropped  # key sets a worker held unbooked
        return answer

    @app.get("/circuits")
    async def circuits():
        await run_in_threadpool(service.refresh)
        return service.describe()

    @app.get("/circuits/{cid}/client.zip")
    async def client_zip(cid: str):
        path = await run_in_threadpool(service.client_zip, cid)
        return FileResponse(path, media_type="application/zip", filename="client.zip")

    @app.get("/metrics")
    async def prometheus():
        """Prometheus metrics (no token needed)."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs():
        return HTMLResponse(docs_page(app.openapi()))


def _key_routes(app: FastAPI, service: Service, tenants: Tenants, metrics: Metrics) -> None:
    def tenant_of(request: Request) -> Tenant:
        return request.state.tenant

    def mine(request: Request, key_id: str) -> None:
        if not tenants.owns(tenant_of(request), key_id):
            raise NotFound("unknown or evicted key id: upload the evaluation keys again")

    @app.post("/circuits/{cid}/keys")
    async def keys(cid: str, request: Request):
        """Upload evaluation keys (octet-stream); answers the key id to predict with."""
        tenant = tenant_of(request)
        if not tenants.may_add_key_set(tenant):
            raise Busy(f"tenant '{tenant.name}' holds {tenants.key_sets(tenant)} key sets, its limit: "
                       "delete one first", retry_after=5.0)
        admitted = await run_in_threadpool(service.admit, cid)  # room first: 429 before reading 56 MB
        try:
            body = await _body(request, admitted.circuit.max_key_body)
        except BaseException:
            service.release(admitted)
            raise
        key_id = await run_in_threadpool(service.register, cid, body, admitted, tenant.name)
        return {"key_id": key_id}

    @app.delete("/circuits/{cid}/keys/{key_id}")
    async def forget(cid: str, key_id: str, request: Request):
        """Drop a key set (its tenant's only)."""
        mine(request, key_id)
        gone = await run_in_threadpool(service.forget, cid, key_id)
        return {"removed": gone}

    @app.post("/circuits/{cid}/predict")
    async def predict(cid: str, request: Request):
        """One encrypted run: the ciphertext (octet-stream) with header X-Key-Id; answers the encrypted result."""
        c = await run_in_threadpool(service.circuit, cid)
        body = await _body(request, c.max_ciphertext_body)
        key_id = request.headers.get("x-key-id", "")
        mine(request, key_id)
        result, queued, ran = await run_in_threadpool(service.predict, cid, key_id, body, tenant_of(request).name)
        metrics.fhe_seconds.observe(ran)
        metrics.queue_seconds.observe(queued)
        return Response(result, media_type=OCTET,
                        headers={"X-Queue-Seconds": f"{queued:.6f}", "X-Server-Seconds": f"{ran:.6f}"})


async def _internal_errors(request: Request, call_next):
    """Anything a route raised that is not a service error: a 500 with its type, the traceback to the operator's log."""
    try:
        return await call_next(request)
    except Exception as exc:  # noqa: BLE001 - never a traceback to the client; the operator's log gets it
        print(f"[engine] internal error on {request.method} {request.url.path}:\n{traceback.format_exc()}",
              file=sys.stderr, flush=True)
        return _error(500, f"internal error: {type(exc).__name__}")


def docs_page(schema: dict) -> str:
    """The API's routes as one self-contained HTML page (no script, font or style from elsewhere)."""
    rows = []
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            text = op.get("description") or op.get("summary") or ""
            auth = "no" if path in OPEN_ROUTES else "Bearer token"
            rows.append(f"<tr><td><code>{html.escape(method.upper())}</code></td><td><code>{html.escape(path)}</code></td>"
                        f"<td>{html.escape(text)}</td><td>{auth}</td></tr>")
    info = schema.get("info", {})
    return ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(info.get("title", "API"))
            + "</title><style>body{font-family:sans-serif;margin:2em}td,th{border-bottom:1px solid #ccc;padding:.4em;"
              "text-align:left;vertical-align:top}</style></head><body><h1>" + html.escape(info.get("title", "API"))
            + "</h1><p>" + html.escape(info.get("description", "")) + " The schema: <a href='/openapi.json'>/openapi.json</a>."
            "</p><table><tr><th>method</th><th>path</th><th>what it does</th><th>needs</th></tr>" + "".join(rows)
            + "</table></body></html>")


def serve(config: ServiceConfig, host: str = "127.0.0.1", port: int = 8000,
          say: Callable[[str], None] = lambda _m: None, tenants: Tenants | None = None, audit=None,
          ssl_certfile: str | None = None, ssl_keyfile: str | None = None) -> None:
    """Run the service until interrupted."""
    import ctypes
    import signal

    import uvicorn

    # Concrete's runtime (HPX) installs its own SIGPIPE handler at the first encrypted run, in place
    # of Python's "ignore", and that handler aborts the process: one client that went away while the
    # service wrote to it (a killed upload) took the whole service down. Blocked in this thread and
    # every thread started from it, a write to a closed socket is an EPIPE error that asyncio handles.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPIPE})

    try:  # glibc: two malloc arenas, not 8 per core; threads then share (and give back) freed memory
        ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass
    service = Service(config)
    app = create_app(service, say=say, tenants=tenants, audit=audit)
    scheme = "https" if ssl_certfile else "http"
    who = "no tokens" if tenants is None or tenants.tokens is None else f"{len(tenants.tokens)} token(s)"
    say(f"listening on {scheme}://{host}:{port} (backend {config.backend}, {service.pool.workers} worker(s), "
        f"key store {config.key_store_bytes / 2**30:.2f} GiB, {who})")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                    ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
    finally:
        service.close()
