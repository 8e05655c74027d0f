"""``GET /health`` (the model, the index version served, requests in flight) and ``GET /metrics``
(Prometheus text)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from rag.server.protocol import Health
from rag.server.routers.models import index_status
from rag.server.state import State

router = APIRouter()


@router.get("/health")
def health(state: State) -> Health:
    i = state.pipeline.info()
    return Health(model=state.model_name, generator=i.generator, **index_status(i.index).model_dump(),
                  inflight=len(state.admission.running))


@router.get("/metrics")
def metrics(state: State) -> PlainTextResponse:
    return PlainTextResponse(state.metrics.render().decode(), media_type="text/plain; version=0.0.4")
