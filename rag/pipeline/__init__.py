"""Pipelines: retrieval + prompt + generation behind one `Answer` type.

Every entry point (``rag ask``/``chat``/``eval``, the HTTP service, the LangChain adapter) talks
to a `Pipeline`: batch answers (`Pipeline.answer_batch`, or its async twin) and an async event
stream (`Pipeline.astream`: sources, text pieces, then the complete answer). Kinds:
`ChatRagPipeline` (``kind: chat``, the SciPhi flow), `SelfRagPipeline` (``kind: selfrag``) and
`RetrievalPipeline` (``kind: retrieval``); `build_pipeline` makes one from its config.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol, runtime_checkable

from rag.config import PipelineConfig
from rag.errors import ConfigError
from rag.generation import Generator, run_sync
from rag.prompts import check_messages
from rag.retriever import Retriever
from rag.types import (
    Answer,
    AnswerEvent,
    ChatMessage,
    Citation,
    DoneEvent,
    GenerationParams,
    Hit,
    SourcesEvent,
    TextEvent,
)

Conversation = Sequence[ChatMessage]


@runtime_checkable
class Pipeline(Protocol):
    """What every pipeline kind offers its entry points."""

    config: PipelineConfig
    generator: Generator | None
    retriever: Retriever | None

    def validate(self, messages: Conversation) -> None: ...

    def search(self, query: str, top_k: int) -> list[Hit]: ...

    def load(self) -> Pipeline: ...

    async def aanswer_batch(self, conversations: Sequence[Conversation], *, top_k: int | None = None,
                            params: GenerationParams | None = None,
                            hits: Sequence[Sequence[Hit]] | None = None) -> list[Answer]: ...

    def answer_batch(self, conversations: Sequence[Conversation], *, top_k: int | None = None,
                     params: GenerationParams | None = None,
                     hits: Sequence[Sequence[Hit]] | None = None) -> list[Answer]: ...

    def astream(self, messages: Conversation, *, top_k: int | None = None,
                params: GenerationParams | None = None) -> AsyncIterator[AnswerEvent]: ...

    def close(self) -> None: ...


def citations(hits: Sequence[Hit]) -> list[Citation]:
    return [Citation(id=h.passage.id, title=h.passage.title, score=h.score) for h in hits]


class BasePipeline:
    """Shared plumbing: locked retrieval, the sync/async pairs, conveniences.

    The retriever (its SQLite store, encoder and indexes) is used by one thread at a time:
    every search holds ``_search_lock``; async callers search on a worker thread.
    """

    config: PipelineConfig
    generator: Generator | None
    retriever: Retriever | None

    def __init__(self, config: PipelineConfig, generator: Generator | None,
                 retriever: Retriever | None):
        self.config, self.generator, self.retriever = config, generator, retriever
        self._search_lock = threading.Lock()

    def validate(self, messages: Conversation) -> None:
        """Raise `PromptError` for a conversation this pipeline cannot answer (before any work)."""
        check_messages(messages)

    def search_batch(self, queries: Sequence[str], top_k: int) -> list[list[Hit]]:
        if self.retriever is None:
            raise ConfigError(f"pipeline {self.config.name!r} has no index; give it one (--index)")
        with self._search_lock:
            return self.retriever.search_batch(list(queries), top_k)

    def search(self, query: str, top_k: int) -> list[Hit]:
        return self.search_batch([query], top_k)[0]

    async def asearch(self, queries: Sequence[str], top_k: int) -> list[list[Hit]]:
        return await asyncio.to_thread(self.search_batch, queries, top_k)

    async def aanswer_batch(self, conversations: Sequence[Conversation], *, top_k: int | None = None,
                            params: GenerationParams | None = None,
                            hits: Sequence[Sequence[Hit]] | None = None) -> list[Answer]:
        raise NotImplementedError

    def answer_batch(self, conversations: Sequence[Conversation], *, top_k: int | None = None,
                     params: GenerationParams | None = None,
                     hits: Sequence[Sequence[Hit]] | None = None) -> list[Answer]:
        """Answer many conversations with batched retrieval and generation (blocking)."""
        return run_sync(lambda: self.aanswer_batch(conversations, top_k=top_k, params=params, hits=hits))

    async def astream(self, messages: Conversation, *, top_k: int | None = None,
                      params: GenerationParams | None = None) -> AsyncIterator[AnswerEvent]:
        """Sources, then the text, then the answer. Kinds that choose their answer only after
        all candidates are scored (Self-RAG) send the chosen text in one piece."""
        (answer,) = await self.aanswer_batch([messages], top_k=top_k, params=params)
        yield SourcesEvent(hits=answer.hits, retrieval=answer.retrieval)
        if answer.text:
            yield TextEvent(text=answer.text)
        yield DoneEvent(answer=answer)

    async def aanswer(self, messages: Conversation, *, top_k: int | None = None,
                      params: GenerationParams | None = None) -> Answer:
        """One conversation's answer through `astream` (cancelling it aborts generation)."""
        async for event in self.astream(messages, top_k=top_k, params=params):
            if isinstance(event, DoneEvent):
                return event.answer
        raise RuntimeError("pipeline stream ended without an answer")  # pragma: no cover

    def chat(self, messages: Conversation, **kw: Any) -> Answer:
        return self.answer_batch([messages], **kw)[0]

    def ask(self, question: str, **kw: Any) -> Answer:
        return self.chat([ChatMessage(role="user", content=question)], **kw)

    def load(self) -> BasePipeline:
        """Do the heavy work now rather than on the first request: load the generator and the
        retriever's query encoder (one warm-up query). Idempotent."""
        if self.generator is not None:
            self.generator.load()
        if self.retriever is not None:
            self.search("warm-up", 1)
        return self

    def close(self) -> None:
        """Stop the generator's engine (its threads and processes); idempotent."""
        if self.generator is not None:
            self.generator.close()

    def __enter__(self) -> BasePipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


from rag.pipeline.build import build_pipeline  # noqa: E402
from rag.pipeline.chat import ChatRagPipeline, build_context  # noqa: E402
from rag.pipeline.retrieval import RetrievalPipeline  # noqa: E402
from rag.pipeline.selfrag import SelfRagPipeline  # noqa: E402

__all__ = ["BasePipeline", "ChatRagPipeline", "Pipeline", "RetrievalPipeline", "SelfRagPipeline",
           "build_context", "build_pipeline", "citations"]
