"""LangChain adapters: any `rag` retriever as a ``BaseRetriever``, any `rag` pipeline as a
chat model.

    from rag.integrations.langchain import RagChatModel, RagRetriever
    lc = RagRetriever(retriever=load_retriever("indexes/pydoc"), top_k=4)
    docs = lc.invoke("how do I open a file?")       # also .batch([...]) and LCEL (lc | ...)
    chat = RagChatModel(pipeline=pipe)              # invoke / batch / stream / astream
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from rag.errors import PromptError, missing_extra
from rag.generation import iterate_sync
from rag.pipeline import Pipeline
from rag.retriever import Retriever
from rag.types import Answer, ChatMessage, DoneEvent, GenerationParams, TextEvent

try:
    from langchain_core.callbacks import (
        AsyncCallbackManagerForLLMRun,
        CallbackManagerForLLMRun,
        CallbackManagerForRetrieverRun,
    )
    from langchain_core.documents import Document
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.runnables import RunnableConfig
except ImportError:  # pragma: no cover - depends on the environment
    raise missing_extra("langchain-core", "cpu") from None


def hit_to_document(hit: Any) -> Document:
    p = hit.passage
    return Document(id=p.id, page_content=p.text,
                    metadata={**p.meta, "id": p.id, "title": p.title, "score": hit.score,
                              "rank": hit.rank})


class RagRetriever(BaseRetriever):
    """Wraps a `rag.retriever.Retriever`; ``batch`` uses the retriever's batched search."""

    retriever: Retriever
    top_k: int = 4
    filter: dict[str, Any] | None = None

    def _get_relevant_documents(self, query: str, *,
                                run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        return [hit_to_document(h) for h in self.retriever.search(query, self.top_k,
                                                                  filter=self.filter)]

    def batch(self, inputs: list[str], config: RunnableConfig | list[RunnableConfig] | None = None,
              *, return_exceptions: bool = False, **kwargs: Any) -> list[list[Document]]:
        if config is not None or return_exceptions or not inputs:
            return super().batch(inputs, config, return_exceptions=return_exceptions, **kwargs)
        hits = self.retriever.search_batch(list(inputs), self.top_k, filter=self.filter)
        return [[hit_to_document(h) for h in row] for row in hits]


def _to_chat_messages(messages: list[BaseMessage]) -> list[ChatMessage]:
    roles = {"human": "user", "ai": "assistant", "system": "system"}
    out = []
    for i, m in enumerate(messages):
        if m.type not in roles:
            raise PromptError(f"messages[{i}] is a {type(m).__name__}; rag pipelines take system, "
                              "human and ai messages")
        out.append(ChatMessage(role=roles[m.type], content=m.text))
    return out


def _answer_metadata(answer: Answer) -> dict[str, Any]:
    return {"citations": [c.model_dump() for c in answer.citations],
            "finish_reason": answer.finish_reason,
            "retrieval": answer.retrieval.model_dump() if answer.retrieval else None,
            "scores": [s.model_dump() for s in answer.scores]}


class RagChatModel(BaseChatModel):
    """Any `rag.pipeline.Pipeline` as a LangChain chat model: ``invoke``/``batch`` use the
    pipeline's batched answers, ``astream``/``stream`` its token stream. The answer's citations,
    finish reason and Self-RAG scores are in ``response_metadata``; token counts in
    ``usage_metadata``.

        chat = RagChatModel(pipeline=build_pipeline(load_pipeline_config(DEFAULT_PIPELINE)))
        chat.invoke("How do I open a file?").content
    """

    pipeline: Pipeline

    @property
    def _llm_type(self) -> str:
        return "rag-pipeline"

    def _result(self, answer: Answer) -> ChatResult:
        u = answer.usage
        message = AIMessage(content=answer.text, response_metadata=_answer_metadata(answer),
                            usage_metadata={"input_tokens": u.prompt_tokens,
                                            "output_tokens": u.completion_tokens,
                                            "total_tokens": u.total_tokens})
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        return self._result(self.pipeline.answer_batch([_to_chat_messages(messages)],
                                                        params=self._params(stop))[0])

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None,
                         **kwargs: Any) -> ChatResult:
        return self._result(await self.pipeline.aanswer(_to_chat_messages(messages),
                                                        params=self._params(stop)))

    def _params(self, stop: list[str] | None) -> GenerationParams | None:
        base = self.pipeline.info().generation
        if not stop or base is None:
            return None
        return base.model_copy(update={"stop": list(dict.fromkeys(base.stop + stop))})

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        async for event in self.pipeline.astream(_to_chat_messages(messages), params=self._params(stop)):
            if isinstance(event, TextEvent):
                if run_manager is not None:
                    await run_manager.on_llm_new_token(event.text)
                yield ChatGenerationChunk(message=AIMessageChunk(content=event.text))
            elif isinstance(event, DoneEvent):
                u = event.answer.usage
                yield ChatGenerationChunk(message=AIMessageChunk(
                    content="", response_metadata=_answer_metadata(event.answer),
                    usage_metadata={"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens,
                                    "total_tokens": u.total_tokens}))

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        yield from iterate_sync(lambda: self._astream(messages, stop))
