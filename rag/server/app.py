"""The app: limits, the guard middleware, the error handler and the routers; `serve` runs it."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import FrameType

from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

from rag.errors import missing_extra
from rag.pipeline import Pipeline
from rag.server import errors
from rag.server.errors import HTTPError
from rag.server.protocol import ServiceLimits
from rag.server.routers import chat, completions, health, models, retrieve, runs
from rag.server.state import ServerState

#: The playground loads nothing from elsewhere and runs no inline script; report images are blobs.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; object-src 'none'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
PUBLIC = ("/health", "/metrics", "/", "/favicon.ico")  # the page holds nothing secret


def create_app(pipeline: Pipeline, *, model_name: str | None = None, api_key: str | None = None,
               limits: ServiceLimits | None = None, runs_dir: Path | None = None) -> FastAPI:
    """The ASGI app around a loaded pipeline. ``app.state.rag.admission.abort_all()`` aborts
    every in-flight request; `serve` calls it on SIGTERM/SIGINT. ``runs_dir``: the folder whose
    eval reports the playground may open (none when unset)."""
    state = ServerState(pipeline, model_name or pipeline.info().name, limits or ServiceLimits(),
                        runs_dir=runs_dir, api_key=api_key)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.admission.abort_all()

    app = FastAPI(title="rag", version="0.1.0", lifespan=lifespan)
    app.state.rag = state
    app.mount("/static", StaticFiles(directory=runs.STATIC), name="static")
    errors.install(app)
    app.middleware("http")(_Guard(state))
    for module in (chat, completions, retrieve, models, runs, health):
        app.include_router(module.router)
    return app


class _Guard:
    """Every request: the API key, the body size, security headers and the request metrics."""

    def __init__(self, state: ServerState):
        self.state = state

    def check(self, request: Request, body: bytes | None) -> None:
        key, limit = self.state.api_key, self.state.limits.max_body_bytes
        path = request.url.path
        if key and path not in PUBLIC and not path.startswith("/static/"):
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.encode()):
                raise HTTPError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                                code="invalid_api_key")
        if body is not None and len(body) > limit:
            raise HTTPError(413, f"request body of {len(body)} bytes exceeds {limit}", code="body_too_large")

    async def __call__(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        t0 = time.perf_counter()
        try:
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.state.limits.max_body_bytes:
                raise HTTPError(413, f"request body of {length} bytes exceeds "
                                     f"{self.state.limits.max_body_bytes}", code="body_too_large")
            self.check(request, await request.body() if request.method == "POST" else None)
            response = await call_next(request)
        except HTTPError as e:
            response = e.response()
        response.headers.update(SECURITY_HEADERS)
        route = "/static" if request.url.path.startswith("/static/") else request.url.path  # one label
        self.state.metrics.requests.labels(route, str(response.status_code)).inc()
        self.state.metrics.latency.labels(route).observe(time.perf_counter() - t0)
        return response


def serve(pipeline: Pipeline, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: ServiceLimits | None = None, runs_dir: Path | None = None) -> None:
    """Run the service with uvicorn (blocking). SIGTERM or Ctrl-C aborts in-flight requests at
    once, and the pipeline's engine (threads and processes) is shut down before this returns."""
    try:
        import uvicorn
    except ImportError:
        raise missing_extra("uvicorn", "serve") from None
    pipeline.load()  # the engine starts before the port opens, not on the first request
    app = create_app(pipeline, api_key=api_key, limits=limits, runs_dir=runs_dir)
    admission = app.state.rag.admission

    class Server(uvicorn.Server):
        loop: asyncio.AbstractEventLoop | None = None

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.loop is not None:  # abort in-flight work now, not after the grace period
                self.loop.call_soon_threadsafe(admission.abort_all)
            super().handle_exit(sig, frame)

        async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)  # type: ignore[arg-type]

    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5))
    try:
        server.run()
    finally:
        pipeline.close()
