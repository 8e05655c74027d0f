"""``POST /v1/retrieve``: ranked passages from a served pipeline's index (its mode, or ``mode``)."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter

from rag.server.errors import HTTPError
from rag.server.protocol import HitList, RetrieveRequest
from rag.server.sampling import check_top_k
from rag.server.state import State

router = APIRouter()


@router.post("/v1/retrieve")
async def retrieve(req: RetrieveRequest, state: State) -> HitList:
    served = state.pick(req.model)
    if served.pipeline.retriever is None:
        raise HTTPError(400, f"the pipeline {served.name!r} has no index; start rag serve with --index")
    check_top_k(req.top_k, state.limits, "top_k")
    t0 = time.perf_counter()
    hits = await asyncio.to_thread(served.pipeline.search, req.query, req.top_k, mode=req.mode)
    state.metrics.retrieval.observe(time.perf_counter() - t0)
    return HitList(data=[h.to_json() for h in hits])
