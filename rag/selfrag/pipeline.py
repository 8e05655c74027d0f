"""`SelfRagPipeline`: the Self-RAG decoder behind the same `Answer` type as the chat flow."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rag.config import PipelineConfig
from rag.generation import Generator
from rag.prompts import get_format, last_user_message
from rag.prompts.sanitize import tokenizer_control_strings
from rag.retriever import Retriever
from rag.selfrag.critic import make_critic
from rag.selfrag.decoder import SelfRagDecoder
from rag.types import Answer, ChatMessage, GenerationParams, Hit


class SelfRagPipeline:
    """Questions -> Self-RAG (short-form rerank or long-form tree search) -> `Answer`."""

    def __init__(self, config: PipelineConfig, generator: Generator,
                 retriever: Retriever | None = None):
        self.config = config
        self.generator = generator
        self.retriever = retriever
        self._decoder: SelfRagDecoder | None = None

    @property
    def decoder(self) -> SelfRagDecoder:
        if self._decoder is None:
            s = self.config.selfrag
            fmt = None
            if s.critic == "prompted":
                tok = self.generator.tokenizer
                fmt = get_format(self.config.prompt.format, tokenizer=tok,
                                 extra_control=tokenizer_control_strings(tok))
            critic = make_critic(s.critic, self.generator, instruction=s.instruction, fmt=fmt)
            self._decoder = SelfRagDecoder(self.generator, critic, s, self.config.generation)
        return self._decoder

    def _search(self, queries: Sequence[str], k: int) -> list[list[Hit]]:
        assert self.retriever is not None
        return self.retriever.search_batch(list(queries), k)

    def answer_batch(self, questions: Sequence[str], *, top_k: int | None = None,
                     hits: Sequence[Sequence[Hit]] | None = None,
                     params: GenerationParams | None = None) -> list[Answer]:
        k = top_k or self.config.retrieval.top_k
        search = self._search if self.retriever is not None else None
        dec = self.decoder
        if params is not None:
            dec = SelfRagDecoder(dec.generator, dec.critic, dec.settings, params)
        if self.config.selfrag.decoding == "long":
            return [dec.long_form(q, search, k, hits[i] if hits is not None else None)
                    for i, q in enumerate(questions)]
        return dec.short_form(list(questions), search, k, hits)

    def ask(self, question: str, **kw: Any) -> Answer:
        return self.answer_batch([question], **kw)[0]

    def chat_batch(self, conversations: Sequence[Sequence[ChatMessage]], **kw: Any) -> list[Answer]:
        """Self-RAG is single-turn: each conversation is answered from its last user message."""
        return self.answer_batch([last_user_message(c) for c in conversations], **kw)

    def chat(self, messages: Sequence[ChatMessage], **kw: Any) -> Answer:
        return self.chat_batch([messages], **kw)[0]
