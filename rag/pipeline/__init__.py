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
from concurrent.futures import Future
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

from rag.config import PipelineConfig, RetrievalPipelineConfig
from rag.errors import ConfigError
from rag.generation import Generator, run_sync
from rag.pipeline.queries import plan_texts, planned_hits, query_plan, search_depth
from rag.prompts import check_messages
from rag.rerank import Reranker, load_reranker, rerank_hits
from rag.retriever import Retriever, query_embedder, sibling_retriever
from rag.types import (
    Answer,
    AnswerEvent,
    ChatMessage,
    Citation,
    DoneEvent,
    GenerationParams,
    Hit,
    PipelineInfo,
    SourcesEvent,
    TextEvent,
)

Conversation = Sequence[ChatMessage]


@runtime_checkable
class Pipeline(Protocol):
    """What every pipeline kind offers its entry points (the CLI, the service, evaluation, the
    LangChain and SciPhi adapters). ``generator`` is there for the faces that serve the model
    itself (``/v1/completions``, the answer judge); the rest ask `info`."""

    @property
    def config(self) -> PipelineConfig: ...

    @property
    def generator(self) -> Generator | None: ...

    @property
    def retriever(self) -> Retriever | None: ...

    @property
    def reranker(self) -> Reranker | None: ...

    def info(self) -> PipelineInfo: ...

    def validate(self, messages: Conversation) -> None: ...

    def search(self, query: str, top_k: int, *, mode: str | None = None) -> list[Hit]: ...

    def search_batch(self, queries: Sequence[str], top_k: int, *, mode: str | None = None) -> list[list[Hit]]: ...

    def embed_queries(self, texts: Sequence[str]) -> tuple[str, np.ndarray]: ...

    def load(self) -> Pipeline: ...

    async def aanswer_batch(self, conversations: Sequence[Conversation], *, top_k: int | None = None,
                            params: GenerationParams | None = None,
                            hits: Sequence[Sequence[Hit]] | None = None) -> list[Answer]: ...

    def answer_batch(self, conversations: Sequence[Conversation], *, top_k: int | None = None,
                     params: GenerationParams | None = None,
                     hits: Sequence[Sequence[Hit]] | None = None) -> list[Answer]: ...

    def astream(self, messages: Conversation, *, top_k: int | None = None,
                params: GenerationParams | None = None) -> AsyncIterator[AnswerEvent]: ...

    async def aanswer(self, messages: Conversation, *, top_k: int | None = None,
                      params: GenerationParams | None = None) -> Answer: ...

    def chat(self, messages: Conversation, *, top_k: int | None = None,
             params: GenerationParams | None = None) -> Answer: ...

    def ask(self, question: str, *, top_k: int | None = None, params: GenerationParams | None = None) -> Answer: ...

    def close(self) -> None: ...


def citations(hits: Sequence[Hit]) -> list[Citation]:
    return [Citation(id=h.passage.id, title=h.passage.title, score=h.score) for h in hits]


class BasePipeline:
    """Shared plumbing: locked retrieval, the sync/async pairs, conveniences.

    The retriever (its SQLite store, encoder and indexes) is used by one thread at a time:
    every search holds ``_search_lock``, and so do the other modes' retrievers over the same
    folder (``search(mode=...)``: the service's search tab), built on first use. Async callers
    hand their queries to one search thread, which takes every query that arrived meanwhile in
    one batch: under load (64 concurrent requests, say) the encoder runs a few large batches
    instead of one small call per request.
    """

    config: PipelineConfig
    generator: Generator | None
    retriever: Retriever | None

    def __init__(self, config: PipelineConfig, generator: Generator | None,
                 retriever: Retriever | None):
        self.config, self.generator, self.retriever = config, generator, retriever
        self._search_lock = threading.Lock()
        self._siblings: dict[str, Retriever] = {}  # guarded by _search_lock
        self._pending: list[tuple[list[str], int, Future[list[list[Hit]]]]] = []  # guarded by _pending_lock
        self._pending_lock = threading.Lock()
        self._draining = False
        self._reranker: Reranker | None = None

    def validate(self, messages: Conversation) -> None:
        """Raise `PromptError` for a conversation this pipeline cannot answer (before any work)."""
        check_messages(messages)

    def search_batch(self, queries: Sequence[str], top_k: int, *, mode: str | None = None) -> list[list[Hit]]:
        """Search with the pipeline's retriever, or with ``mode`` (dense, bm25, hybrid) over its folder."""
        if self.retriever is None:
            raise ConfigError(f"pipeline {self.config.name!r} has no index; give it one (--index)")
        with self._search_lock:
            return self._retriever(mode).search_batch(list(queries), top_k)

    def _retriever(self, mode: str | None) -> Retriever:
        """The pipeline's retriever, or the one of ``mode`` over its folder (caller holds the lock)."""
        retriever = self.retriever
        assert retriever is not None
        if mode is None or mode == self.config.retrieval.mode:
            return retriever
        if mode not in self._siblings:
            self._siblings[mode] = sibling_retriever(retriever, mode, device=self.config.retrieval.device,  # type: ignore[arg-type]
                                                     fusion=self.config.retrieval.fusion.model_dump())
        return self._siblings[mode]

    def embed_queries(self, texts: Sequence[str]) -> tuple[str, np.ndarray]:
        """(encoder name, vectors) of ``texts`` as the index's dense search encodes queries
        (``/v1/embeddings``); a BM25-only pipeline uses its folder's dense encoder."""
        if self.retriever is None:
            raise ConfigError(f"pipeline {self.config.name!r} has no index, so no query encoder; give it one (--index)")
        with self._search_lock:
            mode = self.config.retrieval.mode
            embedder = query_embedder(self._retriever("dense" if mode == "bm25" else None))
            if embedder is None:
                raise ConfigError(f"pipeline {self.config.name!r} has no dense query encoder")
            return embedder.name, embedder.encode_queries(list(texts))

    def search(self, query: str, top_k: int, *, mode: str | None = None) -> list[Hit]:
        return self.search_batch([query], top_k, mode=mode)[0]

    async def asearch(self, queries: Sequence[str], top_k: int) -> list[list[Hit]]:
        """`search_batch` from async code, batched with every other caller's queries that
        arrive while a search runs (on any thread or event loop)."""
        future: Future[list[list[Hit]]] = Future()
        with self._pending_lock:
            self._pending.append((list(queries), top_k, future))
            start, self._draining = not self._draining, True
        if start:
            threading.Thread(target=self._drain, name="rag-search", daemon=True).start()
        return await asyncio.wrap_future(future)

    async def conversation_hits(self, conversations: Sequence[Conversation], k: int
                                ) -> tuple[list[list[Hit]], list[str]]:
        """Each conversation's top ``k`` and the query used, by the pipeline's query strategy
        (``retrieval.query``) and reranker (``retrieval.rerank``): ``last_turn`` searches the last
        user turn; ``history`` fuses that ranking (weight 1 - ``history_weight``) with one
        searched by the last turn joined to the ``history_messages`` messages before it
        (reciprocal-rank fusion, no model call; a first turn is searched once); ``rewrite``
        searches the generator's standalone rewrite of the conversation; ``hyde`` fuses the last
        turn's ranking (1 - ``hyde_weight``) with one searched by a passage the generator writes.
        A reranker rescores the first stage's top ``candidates`` against the rewrite, the joined
        turns (history) or the last turn."""
        r = self.config.retrieval
        depth = max(k, r.rerank.candidates) if r.rerank is not None else k
        written: list[str | None] = [None] * len(conversations)
        if r.query in ("rewrite", "hyde"):
            written = list(await asyncio.gather(*(self.rewrite(c, passage=r.query == "hyde") for c in conversations)))
        plans = [query_plan(r, c, w) for c, w in zip(conversations, written, strict=True)]
        texts = plan_texts(plans)
        found = planned_hits(plans, dict(zip(texts, await self.asearch(texts, search_depth(plans, depth)),
                                             strict=True)), depth)
        queries = [p.shown for p in plans]
        if r.rerank is None:
            return [h[:k] for h in found], queries
        reranker = self.reranker
        assert reranker is not None
        scores = await asyncio.gather(*(asyncio.to_thread(reranker.score, p.rerank_by, [h.passage for h in hits])
                                        for hits, p in zip(found, plans, strict=True)))
        return [rerank_hits(h, s, k, weight=r.rerank.weight) for h, s in zip(found, scores, strict=True)], queries

    @property
    def reranker(self) -> Reranker | None:
        """The second stage ``retrieval.rerank`` names (made on first use), or None."""
        config = self.config.retrieval.rerank
        with self._pending_lock:  # made once, whichever thread asks first
            if config is not None and self._reranker is None:
                self._reranker = load_reranker(config, device=self.config.retrieval.device, generator=self.generator)
        return self._reranker

    async def rewrite(self, messages: Conversation, *, passage: bool = False) -> str:
        """The conversation as a standalone search query, or with ``passage`` a short passage
        that answers it (HyDE); kinds with a generator."""
        raise ConfigError(f"retrieval.query: {'hyde' if passage else 'rewrite'} needs a generator; "
                          f"pipeline {self.config.name!r} has none")

    def _drain(self) -> None:
        """Search for everything pending, in batches, until nothing is left."""
        while True:
            with self._pending_lock:
                batch, self._pending = self._pending, []
                if not batch:
                    self._draining = False
                    return
            todo = [(qs, k, f) for qs, k, f in batch if f.set_running_or_notify_cancel()]
            if not todo:  # every caller went away
                continue
            try:
                found = self.search_batch([q for qs, _, _ in todo for q in qs], max(k for _, k, _ in todo))
            except BaseException as e:  # noqa: B036 - every waiting caller gets it
                for _, _, f in todo:
                    f.set_exception(e)
                continue
            i = 0
            for qs, k, f in todo:
                f.set_result([hits[:k] for hits in found[i: i + len(qs)]])
                i += len(qs)

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

    def chat(self, messages: Conversation, *, top_k: int | None = None,
             params: GenerationParams | None = None) -> Answer:
        return self.answer_batch([messages], top_k=top_k, params=params)[0]

    def ask(self, question: str, *, top_k: int | None = None, params: GenerationParams | None = None) -> Answer:
        return self.chat([ChatMessage(role="user", content=question)], top_k=top_k, params=params)

    def info(self) -> PipelineInfo:
        """Name, kind, model, retrieval settings and the index version served now."""
        c, r = self.config, self.retriever
        gen = None if isinstance(c, RetrievalPipelineConfig) or self.generator is None else c.generation
        own = c.retrieval.mode if r is not None else None
        index = r.describe() if r is not None else None
        modes = ["dense", "bm25", "hybrid"] if index is not None and index.index else ([own] if own else [])
        return PipelineInfo(name=c.name, kind=c.kind, retrieval_mode=own, search_modes=modes,
                            top_k=c.retrieval.top_k, index=index,
                            generator=self.generator.model_name if self.generator is not None else None,
                            generation=gen, max_tokens=gen.max_new_tokens if gen is not None else None)

    def load(self) -> BasePipeline:
        """Do the heavy work now rather than on the first request: load the generator and the
        retriever's query encoder (one warm-up query). Idempotent."""
        if self.generator is not None:
            self.generator.load()
        if self.retriever is not None:
            self.search("warm-up", 1)
        return self

    def close(self) -> None:
        """Stop the generator's engine (its threads and processes) and the reranker; idempotent."""
        if self.generator is not None:
            self.generator.close()
        if self._reranker is not None:
            self._reranker.close()

    def __enter__(self) -> BasePipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


from rag.pipeline.build import build_pipeline, build_pipelines  # noqa: E402
from rag.pipeline.chat import ChatRagPipeline, build_context  # noqa: E402
from rag.pipeline.retrieval import RetrievalPipeline  # noqa: E402
from rag.pipeline.selfrag import SelfRagPipeline  # noqa: E402

__all__ = ["BasePipeline", "ChatRagPipeline", "Pipeline", "RetrievalPipeline", "SelfRagPipeline",
           "build_context", "build_pipeline", "build_pipelines", "citations"]
