"""The app: limits, the guard middleware, the error handler and the routers (`rag.server.run`
serves it)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from rag.pipeline import Pipeline
from rag.server import errors
from rag.server.middleware import Guard
from rag.server.protocol import ServiceLimits
from rag.server.routers import chat, completions, health, models, retrieve, runs
from rag.server.state import ServerState


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
    app.middleware("http")(Guard(state))
    for module in (chat, completions, retrieve, models, runs, health):
        app.include_router(module.router)
    return app
