"""Search over a sharded index folder (`rag.index.shards`): every shard searched, the shards'
top k merged by score.

Dense: the query is encoded once and each shard's FAISS index searched with the vector; merged,
a Flat index's top k equals the unsharded index's (same ids and scores; IVF and HNSW shards
return each shard's approximate top k). BM25: each shard's model scores with the statistics of
the whole corpus (document frequencies, document count and mean length summed over the shards,
taken when the shards are opened), so scores equal one model over every passage. Hybrid fuses
the merged dense and BM25 rankings as for one folder.

`ShardedRetriever` opens every shard in this process; under ``rag serve --ray`` each shard is a
`ShardSearch` deployment and `RemoteShards` asks them all at once and merges the same way.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import reduce
from pathlib import Path
from typing import Any

from rag.embedding import Embedder
from rag.index.shards import shard_folders
from rag.retriever import (
    BM25Retriever,
    BM25Stats,
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


def corpus_stats(folder: str | Path) -> BM25Stats:
    """BM25 statistics of every passage of a sharded ``folder``: its shards' summed."""
    return reduce(lambda a, b: a + b, (bm25_stats(f) for f in shard_folders(folder)))


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
            corpus = corpus_stats(folder)
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

    def _per_shard(self, method: str, batch: Any, top_k: int, filter: Filter | None,
                   **kwargs: Any) -> list[list[list[Hit]]]:
        """Every shard's answer to ``method`` (search_vectors, search_batch) for the batch."""
        return [getattr(p, method)(batch, top_k, filter=filter, **kwargs) for p in self.parts]

    def search_vectors(self, vectors: Any, top_k: int = 10, *, filter: Filter | None = None,
                       **kwargs: Any) -> list[list[Hit]]:
        per = self._per_shard("search_vectors", vectors, top_k, filter, **kwargs)
        return [merge([hits[q] for hits in per], top_k) for q in range(len(vectors))]

    def search_batch(self, queries: Sequence[str], top_k: int = 10, *, filter: Filter | None = None,
                     **kwargs: Any) -> list[list[Hit]]:
        _check_top_k(top_k)
        if self.mode == "dense":
            assert self.embedder is not None
            return self.search_vectors(self.embedder.encode_queries(list(queries)), top_k, filter=filter, **kwargs)
        per = self._per_shard("search_batch", list(queries), top_k, filter)
        return [merge([hits[q] for hits in per], top_k) for q in range(len(queries))]


class ShardSearch:
    """One shard of a sharded folder, searched where it is deployed (a Ray Serve deployment per
    shard under ``rag serve --ray``): dense by query vectors, BM25 by query text with the
    corpus-wide ``stats`` it was deployed with. Each search first reopens the shard if a newer
    version was published (BM25 keeps the deployment's statistics until it is redeployed)."""

    def __init__(self, folder: str, stats: BM25Stats | None = None):
        self.folder, self.stats = Path(folder), stats
        self._parts: dict[str, DenseRetriever | BM25Retriever] = {}  # guarded by _lock
        self._lock = threading.Lock()  # one search at a time, so a reopen never closes a part in use

    def _part(self, mode: str) -> Any:
        part = self._parts.get(mode)
        if part is not None and part.stale():
            part.close()
            part = None
        if part is None:
            part = (DenseRetriever.from_folder(self.folder) if mode == "dense" else
                    BM25Retriever(self.folder, corpus=self.stats))
            self._parts[mode] = part
        return part

    def search_vectors(self, vectors: Any, top_k: int, filter: Filter | None = None) -> list[list[Hit]]:
        with self._lock:
            return self._part("dense").search_vectors(vectors, top_k, filter=filter)  # type: ignore[no-any-return]

    def search_batch(self, queries: list[str], top_k: int, filter: Filter | None = None) -> list[list[Hit]]:
        with self._lock:
            return self._part("bm25").search_batch(queries, top_k, filter=filter)  # type: ignore[no-any-return]


class RemoteShards(ShardedRetriever):
    """A sharded folder whose shards are searched by remote `ShardSearch` deployments (``handles``:
    Ray Serve deployment handles, one per shard): every shard is asked at once, then the answers
    are merged as for local shards. The query encoder runs here."""

    def __init__(self, folder: str | Path, handles: Sequence[Any], mode: Mode, embedder: Embedder | None = None):
        super().__init__(folder, [], mode, embedder)
        self.handles = list(handles)

    @classmethod
    def of(cls, folder: str | Path, handles: Sequence[Any], mode: Mode, fusion: dict[str, Any] | None = None,
           embedder: Embedder | None = None) -> _Base:
        from rag.index.folder import embedder_from_manifest, read_manifest

        if mode == "hybrid":
            dense = cls.of(folder, handles, "dense", embedder=embedder)
            return HybridRetriever(dense, cls(folder, handles, "bm25"), **(fusion or {}))  # type: ignore[arg-type]
        if mode == "dense" and embedder is None:
            embedder = embedder_from_manifest(read_manifest(shard_folders(folder)[0]))
        return cls(folder, handles, mode, embedder)

    def describe(self) -> IndexInfo:
        from rag.index.folder import read_manifest

        assert self.folder is not None
        ms = [read_manifest(f) for f in shard_folders(self.folder)]
        return IndexInfo(index=str(self.folder), version=None, passages=sum(m.passages for m in ms),
                         built_at=max(m.built_at for m in ms), changes=sum(len(m.history) for m in ms))

    def stale(self) -> bool:
        return False  # the shard deployments follow their folders

    def close(self) -> None:
        pass  # the deployments belong to the Serve application

    def _per_shard(self, method: str, batch: Any, top_k: int, filter: Filter | None,
                   **kwargs: Any) -> list[list[list[Hit]]]:
        """Every shard deployment asked at once (search breadth options are the shards' own)."""
        calls = [getattr(h, method).remote(batch, top_k, filter) for h in self.handles]
        return [call.result() for call in calls]
