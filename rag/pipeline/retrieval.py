"""`RetrievalPipeline` (``kind: retrieval``): ranked hits, no text."""

from __future__ import annotations

import time
from collections.abc import Sequence

from rag.config import RetrievalPipelineConfig
from rag.pipeline import BasePipeline, Conversation, citations
from rag.retriever import Retriever
from rag.types import Answer, GenerationParams, Hit, Timings, Trace


class RetrievalPipeline(BasePipeline):
    """Answers carry the ranked hits (searched by ``retrieval.query``) and no text: retrieval evaluation,
    ``rag ask`` on an index, with the same retriever objects the other pipelines use."""

    config: RetrievalPipelineConfig

    def __init__(self, config: RetrievalPipelineConfig, retriever: Retriever):
        super().__init__(config, None, retriever)

    async def aanswer_batch(self, conversations: Sequence[Conversation], *, top_k: int | None = None,
                            params: GenerationParams | None = None,
                            hits: Sequence[Sequence[Hit]] | None = None) -> list[Answer]:
        for convo in conversations:
            self.validate(convo)
        k = top_k or self.config.retrieval.top_k
        t0 = time.perf_counter()
        queries: list[str | None] = [None] * len(conversations)
        if hits is not None:
            found = [list(h)[:k] for h in hits]
        else:
            found, searched = await self.conversation_hits(conversations, k)
            queries = list(searched)
        t = (time.perf_counter() - t0) / max(1, len(conversations))
        return [Answer(text="", hits=h, citations=citations(h), timings=Timings(retrieval_s=t), trace=Trace(query=q))
                for h, q in zip(found, queries, strict=True)]
