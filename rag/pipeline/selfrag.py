"""`SelfRagPipeline` (``kind: selfrag``): the Self-RAG decoder behind the same `Answer` type as
the chat flow."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from rag.config import SelfRagPipelineConfig
from rag.generation import Generator
from rag.pipeline import BasePipeline, Conversation
from rag.prompts import get_format, last_user_message
from rag.retriever import Retriever
from rag.selfrag.critic import make_critic
from rag.selfrag.decoder import SearchFn, SelfRagDecoder
from rag.types import Answer, GenerationParams, Hit


class SelfRagPipeline(BasePipeline):
    """Questions -> Self-RAG (short-form rerank or long-form tree search) -> `Answer`.

    Self-RAG is single-turn: each conversation is answered from its last user message."""

    config: SelfRagPipelineConfig
    generator: Generator

    def __init__(self, config: SelfRagPipelineConfig, generator: Generator,
                 retriever: Retriever | None = None):
        super().__init__(config, generator, retriever)
        self._decoder: SelfRagDecoder | None = None

    @property
    def decoder(self) -> SelfRagDecoder:
        if self._decoder is None:
            s = self.config.selfrag
            fmt = None
            if s.critic == "prompted":
                fmt = get_format(self.config.prompt.format, generator=self.generator,
                                 extra_control=self.generator.control_strings())
            critic = make_critic(s.critic, self.generator, instruction=s.instruction, fmt=fmt,
                                 relevance=s.relevance)
            self._decoder = SelfRagDecoder(self.generator, critic, s, self.config.generation)
        return self._decoder

    async def aanswer_batch(self, conversations: Sequence[Conversation], *, top_k: int | None = None,
                            params: GenerationParams | None = None,
                            hits: Sequence[Sequence[Hit]] | None = None) -> list[Answer]:
        for convo in conversations:
            self.validate(convo)
        questions = [last_user_message(c) for c in conversations]
        k = top_k or self.config.retrieval.top_k
        search: SearchFn | None = self.asearch if self.retriever is not None else None
        dec = self.decoder
        if params is not None:
            dec = SelfRagDecoder(dec.generator, dec.critic, dec.settings, params)
        if self.config.selfrag.decoding == "long":
            return list(await asyncio.gather(*(
                dec.long_form(q, search, k, hits[i] if hits is not None else None)
                for i, q in enumerate(questions))))
        return await dec.short_form(questions, search, k, hits)
