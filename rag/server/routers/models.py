"""``GET /v1/models`` (the served pipelines, by the name a request's ``model`` picks) and
``GET /v1/info?model=`` (what the playground needs)."""

from __future__ import annotations

from fastapi import APIRouter

from rag.server.protocol import IndexStatus, Info, ModelCard, ModelList
from rag.server.state import State
from rag.types import IndexInfo

router = APIRouter()


def index_status(index: IndexInfo | None) -> IndexStatus:
    if index is None:
        return IndexStatus()
    return IndexStatus(index=index.index, version=index.version, passages=index.passages)


@router.get("/v1/models")
def models(state: State) -> ModelList:
    return ModelList(data=[ModelCard(id=name, created=state.created) for name in state.models])


@router.get("/v1/info")
def info(state: State, model: str | None = None) -> Info:
    served = state.pick(model)
    i = served.pipeline.info()
    return Info(model=served.name, models=list(state.models), generator=i.generator, kind=i.kind,
                retrieval_mode=i.retrieval_mode, search_modes=i.search_modes, top_k=i.top_k,
                index=index_status(i.index) if i.index is not None else None,
                max_tokens=i.max_tokens, runs=state.runs_dir is not None)
