"""HTTP in front of :class:`engine.serve.hosting.Service` (FastAPI + uvicorn), with Prometheus metrics.

``python -m engine serve`` runs it. Binary bodies are ``application/octet-stream``; errors are
``{"error": "..."}`` with a 4xx status; ``/health`` answers 200 only once every circuit is
loaded and warmed. The core engine never imports this module.
"""

from __future__ import annotations

import threading
import time
import traceback
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool

from ..config import ServiceConfig
from .hosting import Busy, Service, ServiceError, TooLarge

OCTET = "application/octet-stream"


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message.splitlines()[0][:300] if message else "error"}, status, headers=headers)


class Metrics:
    def __init__(self, service: Service):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("engine_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
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
        Gauge("engine_process_rss_bytes", "resident memory of the service process", registry=r).set_function(
            lambda: service.stats()["rss_bytes"])


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


def create_app(service: Service, load: bool = True, say: Callable[[str], None] = lambda _m: None) -> FastAPI:
    """The FastAPI app; with ``load`` the circuits load in the background (``/health`` says when)."""
    app = FastAPI(title="Encrypted MedMNIST inference", docs_url=None, redoc_url=None)
    metrics = Metrics(service)
    state = {"error": None}
    app.state.service = service

    def _load() -> None:
        try:
            service.load(say)
            say(f"ready: {len(service.circuits)} circuit(s)")
        except Exception as exc:  # noqa: BLE001 - reported by /health
            state["error"] = f"{type(exc).__name__}: {exc}"
            say(f"loading failed: {state['error']}\n{traceback.format_exc()}")

    if load:
        @app.on_event("startup")
        async def _start() -> None:
            import anyio.to_thread

            anyio.to_thread.current_default_thread_limiter().total_tokens = max(100, 2 * service.pool.max_queue)
            threading.Thread(target=_load, name="load-circuits", daemon=True).start()

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        start = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as exc:  # noqa: BLE001 - never a traceback to the client
            response = _error(500, f"internal error: {type(exc).__name__}")
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.requests.labels(path, str(response.status_code)).inc()
        metrics.latency.labels(path).observe(time.perf_counter() - start)
        if path.endswith("/predict"):
            metrics.predictions.inc()
        return response

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

    @app.get("/health")
    async def health():
        if state["error"]:
            return JSONResponse({"status": "error", "error": state["error"]}, 503)
        if not service.ready:
            return JSONResponse({"status": "starting", "circuits": len(service.circuits)}, 503)
        return {"status": "ok", "circuits": len(service.circuits), "backend": service.config.backend,
                "workers": service.pool.workers, "uptime_s": round(time.time() - service.started, 1)}

    @app.get("/circuits")
    async def circuits():
        await run_in_threadpool(service.refresh)
        return service.describe()

    @app.get("/circuits/{cid}/client.zip")
    async def client_zip(cid: str):
        path = await run_in_threadpool(service.client_zip, cid)
        return FileResponse(path, media_type="application/zip", filename="client.zip")

    @app.post("/circuits/{cid}/keys")
    async def keys(cid: str, request: Request):
        c = await run_in_threadpool(service.admit, cid)  # room first: 429 before reading 56 MB
        try:
            body = await _body(request, c.max_key_body)
        except BaseException:
            service.release(c)
            raise
        key_id = await run_in_threadpool(service.register, cid, body, True)
        return {"key_id": key_id}

    @app.delete("/circuits/{cid}/keys/{key_id}")
    async def forget(cid: str, key_id: str):
        gone = await run_in_threadpool(service.forget, cid, key_id)
        return {"removed": gone}

    @app.post("/circuits/{cid}/predict")
    async def predict(cid: str, request: Request):
        c = await run_in_threadpool(service.circuit, cid)
        body = await _body(request, c.max_ciphertext_body)
        key_id = request.headers.get("x-key-id", "")
        result, queued, ran = await run_in_threadpool(service.predict, cid, key_id, body)
        metrics.fhe_seconds.observe(ran)
        metrics.queue_seconds.observe(queued)
        return Response(result, media_type=OCTET,
                        headers={"X-Queue-Seconds": f"{queued:.6f}", "X-Server-Seconds": f"{ran:.6f}"})

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(config: ServiceConfig, host: str = "127.0.0.1", port: int = 8000,
          say: Callable[[str], None] = lambda _m: None) -> None:
    """Run the service until interrupted."""
    import ctypes

    import uvicorn

    try:  # glibc: two malloc arenas, not 8 per core; threads then share (and give back) freed memory
        ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass
    service = Service(config)
    app = create_app(service, say=say)
    say(f"listening on http://{host}:{port} (backend {config.backend}, {service.pool.workers} worker(s), "
        f"key store {config.key_store_bytes / 2**30:.2f} GiB)")
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        service.close()
