"""Search over a sharded index folder (`rag.index.shards`): every shard searched, the shards'
top k merged by score.

Dense: the query is encoded once and each shard's FAISS index searched with the vector; merged,
a Flat index's top k equals the unsharded index's (same ids and scores; IVF and HNSW shards
return each shard's approximate top k). BM25: each shard's model scores with the statistics of
the whole corpus (document frequencies, document count and mean length summed over the shards,
taken when the shards are opened), so scores equal one model over every passage. Hybrid fuses
the merged dense and BM25 rankings as for one folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import reduce
from pathlib import Path
from typing import Any

from rag.embedding import Embedder
from rag.index.shards import shard_folders
from rag.retriever import (
    BM25Retriever,
    DenseRetriever,
    Filter,
    HybridRetriever,
    Mode,
    _Base,
    _check_top_k,
    bm25_stats,
    open_retriever,
)
from rag.types import Hit, IndexInfo


def merge(parts: Sequence[Sequence[Hit]], k: int) -> list[Hit]:
    """The top ``k`` of several rankings by score (ties by passage id), re-ranked 1..k."""
    best = sorted((h for hits in parts for h in hits), key=lambda h: (-h.score, h.passage.id))[:k]
    return [h.model_copy(update={"rank": i + 1}) for i, h in enumerate(best)]


class ShardedRetriever(_Base):
    """One mode (dense or BM25) over every shard of a sharded folder."""

    def __init__(self, folder: str | Path, parts: Sequence[DenseRetriever | BM25Retriever], mode: Mode,
                 embedder: Embedder | None = None):
        self.folder, self.parts, self.mode, self.embedder = Path(folder), list(parts), mode, embedder

    @classmethod
    def open(cls, folder: str | Path, mode: Mode, *, device: str = "auto", embedder: Embedder | None = None,
             fusion: dict[str, Any] | None = None, **kwargs: Any) -> _Base:
        """Open every shard of ``folder`` (its published versions now) for ``mode``."""
        folders = shard_folders(folder)
        if mode == "hybrid":
            dense = cls.open(folder, "dense", device=device, embedder=embedder, **kwargs)
            return HybridRetriever(dense, cls.open(folder, "bm25"), **(fusion or {}))  # type: ignore[arg-type]
        parts: list[DenseRetriever | BM25Retriever] = []
        if mode == "bm25":
            corpus = reduce(lambda a, b: a + b, (bm25_stats(f) for f in folders))
            parts = [BM25Retriever(f, corpus=corpus) for f in folders]
            return cls(folder, parts, mode)
        for f in folders:
            part = open_retriever(f, "dense", device=device, embedder=embedder, **kwargs)
            assert isinstance(part, DenseRetriever)
            embedder = embedder or part.embedder  # loaded once, shared by the shards
            parts.append(part)
        return cls(folder, parts, mode, embedder)

    def describe(self) -> IndexInfo:
        infos = [p.describe() for p in self.parts]
        return IndexInfo(index=str(self.folder), version=None, passages=sum(i.passages for i in infos),
                         built_at=max((i.built_at or "" for i in infos), default=None) or None,
                         changes=sum(i.changes for i in infos))

    def stale(self) -> bool:
        return any(p.stale() for p in self.parts)

    def close(self) -> None:
        for p in self.parts:
            p.close()

    def search_vectors(self, vectors: Any, top_k: int = 10, *, filter: Filter | None = None,
                       **kwargs: Any) -> list[list[Hit]]:
        per = [p.search_vectors(vectors, top_k, filter=filter, **kwargs) for p in self.parts
               if isinstance(p, DenseRetriever)]
        return [merge([hits[q] for hits in per], top_k) for q in range(len(vectors))]

    def search_batch(self, queries: Sequence[str], top_k: int = 10, *, filter: Filter | None = None,
                     **kwargs: Any) -> list[list[Hit]]:
        _check_top_k(top_k)
        if self.mode == "dense":
            assert self.embedder is not None
            return self.search_vectors(self.embedder.encode_queries(list(queries)), top_k, filter=filter, **kwargs)
        per = [p.search_batch(queries, top_k, filter=filter) for p in self.parts]
        return [merge([hits[q] for hits in per], top_k) for q in range(len(queries))]
