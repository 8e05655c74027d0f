"""``POST /v1/rerank`` (and ``/rerank``): a served pipeline's reranker (``retrieval.rerank``) in
the Cohere/Jina shape vLLM also serves: documents scored against a query, best first."""

from __future__ import annotations

import asyncio
import uuid

from fastapi import APIRouter

from rag.server.errors import HTTPError
from rag.server.protocol import RerankRequest, RerankResponse, RerankResult
from rag.server.sampling import check_text
from rag.server.state import State
from rag.types import Passage

router = APIRouter()
MAX_DOCUMENTS = 1000


@router.post("/v1/rerank")
@router.post("/rerank")
async def rerank(req: RerankRequest, state: State) -> RerankResponse:
    served = state.pick(req.model)
    reranker = served.pipeline.reranker
    if reranker is None:
        raise HTTPError(400, f"the pipeline {served.name!r} has no reranker (retrieval.rerank)", param="model")
    texts = [d if isinstance(d, str) else d.text for d in req.documents]
    if not 1 <= len(texts) <= MAX_DOCUMENTS:
        raise HTTPError(400, f"documents must hold 1 to {MAX_DOCUMENTS} texts, got {len(texts)}", param="documents")
    for i, t in enumerate([req.query, *texts]):
        check_text(t, "query" if i == 0 else f"documents[{i - 1}]")
        if len(t) > state.limits.max_message_chars:
            raise HTTPError(400, f"{'query' if i == 0 else f'documents[{i - 1}]'} has {len(t)} characters; the "
                                 f"limit is {state.limits.max_message_chars}", param="documents")
    passages = [Passage(id=str(i), title="", text=t) for i, t in enumerate(texts)]
    scores = await asyncio.to_thread(reranker.score, req.query, passages)
    order = sorted(range(len(texts)), key=lambda i: (-scores[i], i))[: req.top_n or len(texts)]
    return RerankResponse(id=f"rerank-{uuid.uuid4().hex}", model=served.name, results=[
        RerankResult(index=i, relevance_score=scores[i], document={"text": texts[i]} if req.return_documents else None)
        for i in order])
