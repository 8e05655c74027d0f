"""Retrievers: dense (FAISS), BM25 (bm25s) and hybrid (weighted rank or score fusion).

All return `Hit`s with higher-is-better scores and 1-based ranks. ``filter`` restricts results
to passages whose metadata (or id/title) equals every given value.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from rag.embedding import Embedder, passage_text
from rag.errors import ConfigError, missing_extra
from rag.index.folder import (
    INDEX_FILE,
    STORE_FILE,
    Manifest,
    check_embedder,
    check_sizes,
    embedder_from_manifest,
    read_manifest,
)
from rag.index.vectors import FaissIndex, VectorIndex
from rag.store import PassageStore
from rag.types import Hit

log = logging.getLogger(__name__)

Filter = dict[str, Any]
Mode = Literal["dense", "bm25", "hybrid"]


@runtime_checkable
class Retriever(Protocol):
    def search(self, query: str, top_k: int = 10, *, filter: Filter | None = None) -> list[Hit]: ...

    def search_batch(self, queries: Sequence[str], top_k: int = 10, *,
                     filter: Filter | None = None) -> list[list[Hit]]: ...


class _Base:
    store: PassageStore

    def search(self, query: str, top_k: int = 10, *, filter: Filter | None = None) -> list[Hit]:
        return self.search_batch([query], top_k, filter=filter)[0]

    def search_batch(self, queries: Sequence[str], top_k: int = 10, *,
                     filter: Filter | None = None) -> list[list[Hit]]:
        raise NotImplementedError

    def _hits(self, rows: Sequence[int], scores: Sequence[float]) -> list[Hit]:
        keep = [(int(r), float(s)) for r, s in zip(rows, scores, strict=True) if r >= 0]
        passages = self.store.get_rows([r for r, _ in keep])
        return [Hit(passage=p, score=s, rank=i + 1)
                for i, (p, (_, s)) in enumerate(zip(passages, keep, strict=True))]


def _check_top_k(top_k: int) -> None:
    if top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")


class DenseRetriever(_Base):
    """Embed queries, search a vector index, fetch passages from the store; rows the store lists
    as deleted are never returned.

    Args:
        embedder: encodes the queries (the one the index was built with).
        index: any `VectorIndex` (`FaissIndex`, `NumpyFlatIndex`).
        store: the passages, row ``i`` = vector ``i``.
        nprobe, ef_search: default IVF / HNSW search breadth (overridable per call).
    """

    def __init__(self, embedder: Embedder, index: VectorIndex, store: PassageStore, *,
                 manifest: Manifest | None = None, folder: str | Path | None = None,
                 nprobe: int | None = None, ef_search: int | None = None):
        self.embedder, self.index, self.store = embedder, index, store
        self.manifest, self.folder = manifest, Path(folder) if folder is not None else None
        self.nprobe, self.ef_search = nprobe, ef_search
        self.deleted = np.asarray(store.deleted_rows(), dtype=np.int64)

    @classmethod
    def from_folder(cls, folder: str | Path, *, embedder: Embedder | None = None, device: str = "auto",
                    nprobe: int | None = None, ef_search: int | None = None, mmap: bool = False,
                    precision: str | None = None) -> DenseRetriever:
        """Open an index folder made by `build_index`.

        Args:
            embedder: defaults to the one named in the manifest; another one is refused.
            device: ``auto`` (GPU when faiss-gpu sees one), ``cpu`` or ``gpu``.
            mmap: memory-map the index file instead of reading it (large indexes).
            precision: query encoder precision (default: the one the index was built with).
        """
        folder = Path(folder)
        manifest = read_manifest(folder)
        check_sizes(folder)
        embedder = embedder or embedder_from_manifest(manifest, **({"precision": precision} if precision else {}))
        check_embedder(manifest, embedder, folder)
        store = PassageStore(folder / STORE_FILE, readonly=True)
        index = FaissIndex.load(folder / INDEX_FILE, metric=manifest.metric, device=device, mmap=mmap)
        return cls(embedder, index, store, manifest=manifest, folder=folder, nprobe=nprobe, ef_search=ef_search)

    def search_vectors(self, vectors: np.ndarray, top_k: int = 10, *,
                       filter: Filter | None = None, nprobe: int | None = None,
                       ef_search: int | None = None) -> list[list[Hit]]:
        _check_top_k(top_k)
        rows = self.store.rows_matching(filter) if filter else None
        if rows is not None and not rows:
            return [[] for _ in range(len(vectors))]
        scores, ids = self.index.search(vectors, top_k, nprobe=nprobe or self.nprobe,
                                        ef_search=ef_search or self.ef_search, rows=rows,
                                        exclude=self.deleted if len(self.deleted) else None)
        if self.index.metric == "l2":
            scores = -scores  # distances -> higher is better
        return [self._hits(i, s) for i, s in zip(ids, scores, strict=True)]

    def search_batch(self, queries: Sequence[str], top_k: int = 10, *,
                     filter: Filter | None = None, nprobe: int | None = None,
                     ef_search: int | None = None) -> list[list[Hit]]:
        return self.search_vectors(self.embedder.encode_queries(list(queries)), top_k,
                                   filter=filter, nprobe=nprobe, ef_search=ef_search)


class BM25Retriever(_Base):
    """Lexical BM25 (bm25s, Lucene variant, English stopwords) over an index folder's passages.

    The BM25 index is built from the passage store's live passages on first use and saved in
    ``bm25/`` inside the folder (rebuilt after any change to the index).
    """

    def __init__(self, folder: str | Path, *, k1: float = 1.5, b: float = 0.75,
                 stopwords: str | None = "en"):
        try:
            import bm25s
        except ImportError:
            raise missing_extra("bm25s", "cpu") from None
        self._bm25s = bm25s
        logging.getLogger("bm25s").setLevel(logging.WARNING)
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        check_sizes(self.folder)
        self.store = PassageStore(self.folder / STORE_FILE, readonly=True)
        self.stopwords = stopwords
        self.model, self.rows = self._load_or_build(k1, b)

    def _load_or_build(self, k1: float, b: float) -> tuple[Any, np.ndarray]:
        """The BM25 model and, per BM25 document, its store row."""
        bm25s, cache = self._bm25s, self.folder / "bm25"
        m = self.manifest
        stamp = f"{m.passages}:{m.deleted}:{m.built_at}:{len(m.history)}:{k1}:{b}:{self.stopwords}"
        if (cache / "stamp").exists() and (cache / "stamp").read_text() == stamp:
            return bm25s.BM25.load(str(cache), show_progress=False, verbosity=0), np.load(cache / "rows.npy")
        log.info("building the BM25 index of %s (%d passages)", self.folder, len(self.store))
        rows, texts = [], []
        for row, p in self.store.iter_rows():
            rows.append(row)
            texts.append(passage_text(p.title, p.text))
        tokens = bm25s.tokenize(texts, stopwords=self.stopwords, show_progress=False)
        model = bm25s.BM25(k1=k1, b=b)
        model.index(tokens, show_progress=False)
        tmp = self.folder / "bm25.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            model.save(str(tmp), show_progress=False)
            np.save(tmp / "rows.npy", np.asarray(rows, dtype=np.int64))
            (tmp / "stamp").write_text(stamp)
            shutil.rmtree(cache, ignore_errors=True)
            os.rename(tmp, cache)
        except OSError as e:  # a read-only index folder still serves, just without the cache
            log.warning("could not cache the BM25 index in %s: %s", cache, e)
        return model, np.asarray(rows, dtype=np.int64)

    def search_batch(self, queries: Sequence[str], top_k: int = 10, *,
                     filter: Filter | None = None) -> list[list[Hit]]:
        _check_top_k(top_k)
        n = len(self.rows)
        mask = None
        if filter:
            mask = np.isin(self.rows, self.store.rows_matching(filter)).astype(np.float32)
        k = min(top_k, n)
        out: list[list[Hit]] = []
        for q in queries:  # one at a time: bm25s fails on queries with no known token
            toks = self._bm25s.tokenize([q], stopwords=self.stopwords, return_ids=False,
                                        show_progress=False)
            if not toks or not any(t in self.model.vocab_dict for t in toks[0]):
                out.append([])
                continue
            ids, scores = self.model.retrieve([[t for t in toks[0] if t in self.model.vocab_dict]],
                                              k=k, show_progress=False, weight_mask=mask,
                                              n_threads=1)
            keep = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if s > 0]
            out.append(self._hits([int(self.rows[i]) for i, _ in keep], [s for _, s in keep]))
        return out


def fuse(dense: Sequence[Hit], sparse: Sequence[Hit], *, method: str = "rrf", dense_weight: float = 0.5,
         rrf_k: int = 60) -> list[tuple[str, float]]:
    """Fuse two rankings into ``(passage id, score)``, best first (ties by id).

    ``rrf``: ``w / (rrf_k + rank)`` summed over the sides a passage appears in (Cormack et al.,
    2009, weighted). ``minmax``: each side's scores scaled to [0, 1] over its own list, then
    ``w * scaled`` summed (a passage missing from a side gets 0 there). The dense side has weight
    ``dense_weight``, BM25 ``1 - dense_weight``; weight 1 (or 0) reproduces one side's ranking.
    """
    fused: dict[str, float] = {}
    for hits, w in ((dense, dense_weight), (sparse, 1.0 - dense_weight)):
        if method == "minmax" and hits:
            lo, hi = min(h.score for h in hits), max(h.score for h in hits)
            span = hi - lo
            for h in hits:
                fused[h.passage.id] = fused.get(h.passage.id, 0.0) + w * ((h.score - lo) / span if span else 1.0)
        elif method == "rrf":
            for h in hits:
                fused[h.passage.id] = fused.get(h.passage.id, 0.0) + w / (rrf_k + h.rank)
        elif method != "minmax":
            raise ConfigError(f"unknown fusion method {method!r}; use rrf or minmax")
    return sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))


class HybridRetriever(_Base):
    """Dense + BM25 fused by `fuse` (default: equal-weight reciprocal-rank fusion). Each side
    contributes its top ``candidates`` (at least top_k)."""

    def __init__(self, dense: DenseRetriever, bm25: BM25Retriever, *, method: str = "rrf",
                 dense_weight: float = 0.5, rrf_k: int = 60, candidates: int = 100):
        self.dense, self.bm25, self.candidates = dense, bm25, candidates
        self.method, self.dense_weight, self.rrf_k = method, dense_weight, rrf_k
        self.store = dense.store

    def search_batch(self, queries: Sequence[str], top_k: int = 10, *,
                     filter: Filter | None = None) -> list[list[Hit]]:
        _check_top_k(top_k)
        n = max(self.candidates, top_k)
        dense = self.dense.search_batch(queries, n, filter=filter)
        sparse = self.bm25.search_batch(queries, n, filter=filter)
        out = []
        for d_hits, s_hits in zip(dense, sparse, strict=True):
            passages = {h.passage.id: h.passage for hits in (d_hits, s_hits) for h in hits}
            best = fuse(d_hits, s_hits, method=self.method, dense_weight=self.dense_weight, rrf_k=self.rrf_k)
            out.append([Hit(passage=passages[pid], score=s, rank=i + 1) for i, (pid, s) in enumerate(best[:top_k])])
        return out


def sibling_retriever(retriever: Retriever, mode: Mode, *, device: str = "auto",
                      fusion: dict[str, Any] | None = None) -> Retriever:
    """A retriever of another mode over the same index folder, reusing the parts ``retriever``
    already has (its encoder and FAISS index, its BM25 model)."""
    dense = retriever.dense if isinstance(retriever, HybridRetriever) else retriever
    bm25 = retriever.bm25 if isinstance(retriever, HybridRetriever) else retriever
    folder = getattr(dense, "folder", None)
    if folder is None:
        raise ConfigError(f"{type(retriever).__name__} has no index folder; only the pipeline's own "
                          "retrieval mode can be searched")

    def dense_part() -> DenseRetriever:
        return dense if isinstance(dense, DenseRetriever) else DenseRetriever.from_folder(folder, device=device)

    def bm25_part() -> BM25Retriever:
        return bm25 if isinstance(bm25, BM25Retriever) else BM25Retriever(folder)

    if mode == "dense":
        return dense_part()
    if mode == "bm25":
        return bm25_part()
    if mode == "hybrid":
        return HybridRetriever(dense_part(), bm25_part(), **(fusion or {}))
    raise ConfigError(f"unknown retrieval mode {mode!r}; use dense, bm25 or hybrid")


def load_retriever(folder: str | Path, mode: Mode = "dense", *, device: str = "auto",
                   embedder: Embedder | None = None, fusion: dict[str, Any] | None = None,
                   **kwargs: Any) -> Retriever:
    """A retriever over an index folder: ``dense``, ``bm25`` or ``hybrid`` (``fusion``: the
    keyword arguments of `HybridRetriever`)."""
    if mode == "dense":
        return DenseRetriever.from_folder(folder, embedder=embedder, device=device, **kwargs)
    if mode == "bm25":
        return BM25Retriever(folder)
    if mode == "hybrid":
        return HybridRetriever(DenseRetriever.from_folder(folder, embedder=embedder, device=device, **kwargs),
                               BM25Retriever(folder), **(fusion or {}))
    raise ConfigError(f"unknown retrieval mode {mode!r}; use dense, bm25 or hybrid")
