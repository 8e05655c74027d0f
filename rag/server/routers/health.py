"""``GET /health`` (each served pipeline: its model, the index version served, requests in
flight; 503 when an engine has died or an index cannot be read) and ``GET /metrics``
(Prometheus text)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse

from rag.server.protocol import Health, PipelineHealth
from rag.server.routers.models import index_status
from rag.server.state import Served, State

router = APIRouter()


def _check(served: Served) -> PipelineHealth:
    p = served.pipeline
    try:
        i = p.info()  # reads the index's manifest and store
    except Exception as e:  # noqa: BLE001 - reported, not raised: this is the health check
        return PipelineHealth(model=served.name, ok=False, error=f"the index cannot be read: {e}")
    ok = p.generator is None or p.generator.alive()
    return PipelineHealth(model=served.name, generator=i.generator, ok=ok, **index_status(i.index).model_dump(),
                          error=None if ok else "the generator's engine has died; restart the server")


@router.get("/health", responses={503: {"model": Health}})
def health(state: State) -> JSONResponse:
    checks = [_check(s) for s in state.models.values()]
    first = checks[0]
    body = Health(status="ok" if all(c.ok for c in checks) else "error", model=first.model, generator=first.generator,
                  index=first.index, version=first.version, passages=first.passages,
                  inflight=len(state.admission.running), pipelines=checks)
    return JSONResponse(body.model_dump(), status_code=200 if body.status == "ok" else 503)


@router.get("/metrics")
def metrics(state: State) -> PlainTextResponse:
    return PlainTextResponse(state.metrics.render().decode(), media_type="text/plain; version=0.0.4")
