"""LangChain adapters: any `rag` retriever as a ``langchain_core`` ``BaseRetriever``.

    from rag.integrations.langchain import RagRetriever
    lc = RagRetriever(retriever=load_retriever("indexes/pydoc"), top_k=4)
    docs = lc.invoke("how do I open a file?")       # also .batch([...]) and LCEL (lc | ...)
"""

from __future__ import annotations

from typing import Any

from rag.errors import missing_extra

try:
    from langchain_core.callbacks import CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
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

    retriever: Any
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
