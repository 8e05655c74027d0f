"""The app: limits, the guard middleware, the error handler and the routers (`rag.server.run`
serves it)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from rag.errors import ConfigError
from rag.pipeline import Pipeline
from rag.server import errors
from rag.server.middleware import Guard
from rag.server.protocol import ServiceLimits
from rag.server.routers import chat, completions, embeddings, health, models, rerank, retrieve, runs, tokens
from rag.server.state import ServerState


def by_name(pipelines: Pipeline | Sequence[Pipeline], model_name: str | None = None) -> dict[str, Pipeline]:
    """Served pipelines by the ``model`` name clients use: each pipeline's own name (one pipeline
    may be given another); two with one name are a `ConfigError`."""
    if not isinstance(pipelines, Sequence):
        return {model_name or pipelines.info().name: pipelines}
    named: dict[str, Pipeline] = {}
    for p in pipelines:
        name = p.info().name
        if name in named:
            raise ConfigError(f"two pipelines are named {name!r}; give each pipeline file its own 'name:'")
        named[name] = p
    return named


def create_app(pipelines: Pipeline | Sequence[Pipeline], *, model_name: str | None = None,
               api_key: str | None = None, limits: ServiceLimits | None = None,
               runs_dir: Path | None = None, private_probes: bool = False,
               close_pipelines: bool = False) -> FastAPI:
    """The ASGI app around loaded pipelines (one, or several picked by the request's
    ``model``). ``app.state.rag.admission.abort_all()`` aborts every in-flight request; `serve`
    calls it on SIGTERM/SIGINT. ``runs_dir``: the folder whose eval reports the playground may
    open (none when unset). ``private_probes``: ``/health`` and ``/metrics`` need the API key too
    (they are public by default: model and index names, versions, passage counts, request counts
    and latencies by route). ``close_pipelines``: the app owns the pipelines and closes them when
    it shuts down (Ray Serve replicas; `serve` closes its own)."""
    state = ServerState.of(by_name(pipelines, model_name), limits or ServiceLimits(), runs_dir=runs_dir,
                           api_key=api_key, private_probes=private_probes)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.admission.abort_all()
        if close_pipelines:
            for p in state.pipelines():
                await asyncio.to_thread(p.close)

    app = FastAPI(title="rag", version="0.1.0", lifespan=lifespan)
    app.state.rag = state
    app.mount("/static", StaticFiles(directory=runs.STATIC), name="static")
    errors.install(app)
    app.add_middleware(Guard, state=state)
    for module in (chat, completions, embeddings, tokens, rerank, retrieve, models, runs, health):
        app.include_router(module.router)
    return app
