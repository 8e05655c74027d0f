"""``POST /v1/embeddings``: OpenAI's embeddings, made by the encoder the pipeline's index
searches with, so a client's vectors are the ones the index compares against."""

from __future__ import annotations

import asyncio
import base64

from fastapi import APIRouter

from rag.server.errors import HTTPError
from rag.server.protocol import Embedding, EmbeddingList, EmbeddingRequest, UsageOut
from rag.server.sampling import check_text
from rag.server.state import State

router = APIRouter()
MAX_INPUTS = 2048  # OpenAI's bound on one request's inputs


@router.post("/v1/embeddings")
async def embeddings(req: EmbeddingRequest, state: State) -> EmbeddingList:
    served = state.pick(req.model)
    texts = [req.input] if isinstance(req.input, str) else req.input
    if not 1 <= len(texts) <= MAX_INPUTS:
        raise HTTPError(400, f"input must hold 1 to {MAX_INPUTS} texts, got {len(texts)}", param="input")
    for i, t in enumerate(texts):
        check_text(t, f"input[{i}]")
        if not t or len(t) > state.limits.max_message_chars:
            raise HTTPError(400, f"input[{i}] must have 1 to {state.limits.max_message_chars} characters, "
                                 f"got {len(t)}", param="input")
    _, vectors = await asyncio.to_thread(served.pipeline.embed_queries, texts)
    if req.dimensions is not None and req.dimensions != vectors.shape[1]:
        raise HTTPError(400, f"dimensions={req.dimensions}: this index's encoder makes {vectors.shape[1]}-"
                             "dimensional vectors and they are not shortened", param="dimensions")
    vectors = vectors.astype("<f4")
    data = [Embedding(index=i, embedding=base64.b64encode(v.tobytes()).decode() if req.encoding_format == "base64"
                      else v.tolist()) for i, v in enumerate(vectors)]
    return EmbeddingList(data=data, model=served.name, usage=UsageOut.of(0, 0))
