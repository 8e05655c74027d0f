"""Retrievers: dense (FAISS), BM25 (bm25s) and hybrid (weighted rank or score fusion).

All return `Hit`s with higher-is-better scores and 1-based ranks. ``filter`` restricts results
to passages whose metadata (or id/title) equals every given value.

`DenseRetriever.from_folder` and `BM25Retriever` open one published version of an index folder
and keep serving it (a snapshot). `FollowingRetriever` (what `load_retriever` returns, and so
every pipeline, ``rag serve`` included) follows the folder: each search first checks whether a
newer version was published and, if so, opens it and serves it from then on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from rag.embedding import Embedder, passage_text
from rag.errors import ConfigError, RagError, missing_extra
from rag.index.folder import (
    INDEX_FILE,
    STORE_FILE,
    Manifest,
    check_embedder,
    check_sizes,
    embedder_from_manifest,
    load_manifest,
)
from rag.index.owner import Pin, Version, changed, open_consistent
from rag.index.shards import is_sharded
from rag.index.vectors import FaissIndex, VectorIndex
from rag.store import PassageStore
from rag.types import Hit, IndexInfo

log = logging.getLogger(__name__)

Filter = dict[str, Any]
Mode = Literal["dense", "bm25", "hybrid"]
TIE_MARGIN = 32  # BM25 fetches this many more than asked, so passages tied at the cut are chosen by id


@runtime_checkable
class Retriever(Protocol):
    """Ranked passages for queries; says which index (and version) it serves."""

    def search(self, query: str, top_k: int = 10, *, filter: Filter | None = None) -> list[Hit]: ...

    def search_batch(self, queries: Sequence[str], top_k: int = 10, *,
                     filter: Filter | None = None) -> list[list[Hit]]: ...

    def describe(self) -> IndexInfo: ...

    def close(self) -> None: ...


class _Base:
    store: PassageStore
    folder: Path | None = None
    version: Version | None = None
    manifest: Manifest | None = None
    _pin: Pin | None = None

    def describe(self) -> IndexInfo:
        """The index folder and the version this retriever serves (for /health and /v1/info)."""
        m = self.manifest
        return IndexInfo(index=str(self.folder) if self.folder else None,
                         version=self.version.number if self.version else None,
                         passages=m.passages if m else len(self.store), built_at=m.built_at if m else None,
                         changes=len(m.history) if m else 0)

    def stale(self) -> bool:
        """A newer version of the folder was published since this one was opened."""
        return self.version is not None and self.folder is not None and changed(self.folder, self.version)

    def close(self) -> None:
        """Close the store and let go of the version (removed then if a newer one was published)."""
        self.store.close()
        if self._pin is not None:
            self._pin.release()
            self._pin = None

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
        """Open the version an index folder publishes now (a snapshot: it stays on disk and is
        served until `close`; `load_retriever` gives one that follows changes).

        Args:
            embedder: defaults to the one named in the manifest; another one is refused.
            device: ``auto`` (GPU when faiss-gpu sees one), ``cpu`` or ``gpu``.
            mmap: memory-map the index file instead of reading it (large indexes).
            precision: query encoder precision (default: the one the index was built with).
        """
        def opener(path: Path) -> DenseRetriever:
            manifest = load_manifest(path)
            check_sizes(path)
            emb = embedder or embedder_from_manifest(manifest, **({"precision": precision} if precision else {}))
            check_embedder(manifest, emb, folder)
            store = PassageStore(path / STORE_FILE, readonly=True)
            index = FaissIndex.load(path / INDEX_FILE, metric=manifest.metric, device=device, mmap=mmap)
            return cls(emb, index, store, manifest=manifest, folder=folder, nprobe=nprobe, ef_search=ef_search)

        retriever, version, pin = open_consistent(folder, opener)
        retriever.version, retriever._pin = version, pin
        return retriever

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


@dataclass(frozen=True)
class BM25Stats:
    """Corpus statistics BM25 scores with: document frequency per token, documents, tokens."""

    df: dict[str, int]
    docs: int
    tokens: int

    def __add__(self, other: BM25Stats) -> BM25Stats:
        df = dict(self.df)
        for t, n in other.df.items():
            df[t] = df.get(t, 0) + n
        return BM25Stats(df, self.docs + other.docs, self.tokens + other.tokens)

    @property
    def digest(self) -> str:
        data = json.dumps([sorted(self.df.items()), self.docs, self.tokens], ensure_ascii=False)
        return hashlib.sha256(data.encode()).hexdigest()[:16]


def _tokenize(bm25s: Any, store: PassageStore, stopwords: str | None) -> tuple[list[int], Any]:
    rows, texts = [], []
    for row, p in store.iter_rows():
        rows.append(row)
        texts.append(passage_text(p.title, p.text))
    return rows, bm25s.tokenize(texts, stopwords=stopwords, show_progress=False)


def _stats(tokens: Any) -> BM25Stats:
    """The statistics of one tokenized corpus (bm25s ``Tokenized``)."""
    names = {i: t for t, i in tokens.vocab.items()}
    df: dict[str, int] = {}
    for doc in tokens.ids:
        for i in set(doc):
            df[names[i]] = df.get(names[i], 0) + 1
    return BM25Stats(df, len(tokens.ids), sum(len(doc) for doc in tokens.ids))


def _corpus_wide_bm25(bm25s: Any, stats: BM25Stats, vocab: dict[str, int], **kw: Any) -> Any:
    """A bm25s model over one shard whose idf and length normalisation use the whole corpus's
    ``stats``, so its scores equal those of one model over all shards (bm25s's documented
    override point, `BM25.build_index_from_ids`, with bm25s's own scoring functions)."""
    import scipy.sparse as sp
    from bm25s import scoring

    class CorpusWideBM25(bm25s.BM25):  # type: ignore[misc, name-defined]
        def build_index_from_ids(self, unique_token_ids: list[int], corpus_token_ids: list[list[int]],
                                 show_progress: bool = True, leave_progress: bool = False) -> dict[str, Any]:
            names = {i: t for t, i in vocab.items()}
            self.nonoccurrence_array = None  # the Lucene variant has none
            local = scoring._calculate_doc_freqs(corpus_token_ids, unique_token_ids, show_progress=False)
            idf = scoring._build_idf_array({i: stats.df.get(names[i], 0) for i in unique_token_ids}, stats.docs,
                                           scoring._select_idf_scorer(self.idf_method), dtype=self.dtype)
            data, rows, cols = scoring._build_scores_and_indices_for_matrix(
                corpus_token_ids, idf, stats.tokens / stats.docs, local, self.k1, self.b, self.delta, None,
                method=self.method, dtype=self.dtype, int_dtype=self.int_dtype, show_progress=False)
            m = sp.csc_matrix((data, (rows, cols)), shape=(len(corpus_token_ids), len(unique_token_ids)),
                              dtype=self.dtype)
            return {"data": m.data, "indices": m.indices, "indptr": m.indptr, "num_docs": len(corpus_token_ids)}

    return CorpusWideBM25(**kw)


class BM25Retriever(_Base):
    """Lexical BM25 (bm25s, Lucene variant, English stopwords) over an index folder's passages.

    The BM25 index is built from the passage store's live passages on first use and saved in
    ``bm25/`` inside the folder (rebuilt after any change to the index). ``corpus``: statistics
    of a larger corpus this folder is a shard of (`bm25_stats` summed over the shards), used for
    idf and length normalisation instead of the folder's own.
    """

    def __init__(self, folder: str | Path, *, k1: float = 1.5, b: float = 0.75,
                 stopwords: str | None = "en", corpus: BM25Stats | None = None):
        self._bm25s = _import_bm25s()
        self.folder = Path(folder)
        self.stopwords = stopwords

        def opener(path: Path) -> tuple[Manifest, PassageStore, Any, np.ndarray]:
            manifest = load_manifest(path)
            check_sizes(path)
            store = PassageStore(path / STORE_FILE, readonly=True)
            return (manifest, store, *self._load_or_build(path, manifest, store, k1, b, corpus))

        (self.manifest, self.store, self.model, self.rows), self.version, self._pin = open_consistent(
            self.folder, opener)

    def _load_or_build(self, path: Path, m: Manifest, store: PassageStore, k1: float,
                       b: float, corpus: BM25Stats | None) -> tuple[Any, np.ndarray]:
        """The BM25 model and, per BM25 document, its store row (cached in the version's bm25/)."""
        bm25s, cache = self._bm25s, path / "bm25"
        stamp = f"{m.passages}:{m.deleted}:{m.built_at}:{len(m.history)}:{k1}:{b}:{self.stopwords}"
        stamp += f":corpus {corpus.digest}" if corpus is not None else ""
        if (cache / "stamp").exists() and (cache / "stamp").read_text() == stamp:
            return bm25s.BM25.load(str(cache), show_progress=False, verbosity=0), np.load(cache / "rows.npy")
        log.info("building the BM25 index of %s (%d passages)", path, len(store))
        rows, tokens = _tokenize(bm25s, store, self.stopwords)
        model = (bm25s.BM25(k1=k1, b=b) if corpus is None else
                 _corpus_wide_bm25(bm25s, corpus, tokens.vocab, k1=k1, b=b))
        model.index(tokens, show_progress=False)
        tmp = None
        try:  # each reader its own temporary folder: two servers may build the cache at once
            tmp = Path(tempfile.mkdtemp(prefix=".bm25-", dir=path))
            model.save(str(tmp), show_progress=False)
            np.save(tmp / "rows.npy", np.asarray(rows, dtype=np.int64))
            (tmp / "stamp").write_text(stamp)
            if cache.exists():  # a stale cache (folders of the old layout): out of the way first
                old = Path(tempfile.mkdtemp(prefix=".bm25-old-", dir=path))
                os.rename(cache, old / "bm25")
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, cache)
        except OSError as e:  # read-only, or another reader published its cache first: serve anyway
            log.debug("did not cache the BM25 index in %s: %s", cache, e)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        return model, np.asarray(rows, dtype=np.int64)

    def search_batch(self, queries: Sequence[str], top_k: int = 10, *,
                     filter: Filter | None = None) -> list[list[Hit]]:
        _check_top_k(top_k)
        n = len(self.rows)
        mask = None
        if filter:
            mask = np.isin(self.rows, self.store.rows_matching(filter)).astype(np.float32)
        k = min(top_k + TIE_MARGIN, n)
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
            hits = self._hits([int(self.rows[i]) for i, _ in keep], [s for _, s in keep])
            hits.sort(key=lambda h: (-h.score, h.passage.id))  # ties by id, whatever order bm25s found them in
            out.append([h.model_copy(update={"rank": r + 1}) for r, h in enumerate(hits[:top_k])])
        return out


def _import_bm25s() -> Any:
    try:
        import bm25s
    except ImportError:
        raise missing_extra("bm25s", "cpu") from None
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


def bm25_stats(folder: str | Path, stopwords: str | None = "en") -> BM25Stats:
    """The BM25 statistics of the version ``folder`` publishes now (one shard's share)."""
    bm25s = _import_bm25s()

    def opener(path: Path) -> BM25Stats:
        with PassageStore(path / STORE_FILE, readonly=True) as store:
            return _stats(_tokenize(bm25s, store, stopwords)[1])

    stats, _, pin = open_consistent(folder, opener)
    if pin is not None:
        pin.release()
    return stats


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
        self.folder, self.version, self.manifest = dense.folder, dense.version, dense.manifest

    def stale(self) -> bool:
        return self.dense.stale() or self.bm25.stale()

    def describe(self) -> IndexInfo:
        return self.dense.describe()

    def close(self) -> None:
        self.dense.close()
        self.bm25.close()
        if self._pin is not None:
            self._pin.release()
            self._pin = None

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


def _open_mode(path: Path, mode: Mode, *, device: str, embedder: Embedder | None,
               fusion: dict[str, Any] | None, **kwargs: Any) -> _Base:
    if mode == "dense":
        return DenseRetriever.from_folder(path, embedder=embedder, device=device, **kwargs)
    if mode == "bm25":
        return BM25Retriever(path)
    if mode == "hybrid":
        return HybridRetriever(DenseRetriever.from_folder(path, embedder=embedder, device=device, **kwargs),
                               BM25Retriever(path), **(fusion or {}))
    raise ConfigError(f"unknown retrieval mode {mode!r}; use dense, bm25 or hybrid")


def open_retriever(folder: str | Path, mode: Mode = "dense", *, device: str = "auto",
                   embedder: Embedder | None = None, fusion: dict[str, Any] | None = None,
                   **kwargs: Any) -> _Base:
    """A retriever of ``mode`` over the version ``folder`` publishes now, pinned (a snapshot:
    it keeps serving that version; `close` lets go of it)."""
    folder = Path(folder)
    if is_sharded(folder):
        from rag.sharded import ShardedRetriever

        return ShardedRetriever.open(folder, mode, device=device, embedder=embedder, fusion=fusion, **kwargs)
    r, version, pin = open_consistent(
        folder, lambda path: _open_mode(path, mode, device=device, embedder=embedder, fusion=fusion, **kwargs))
    for part in (r, getattr(r, "dense", None), getattr(r, "bm25", None)):
        if part is not None:
            part.folder, part.version = folder, version
    r._pin = pin
    return r


class FollowingRetriever:
    """A retriever over an index folder that serves its newest published version.

    Each search starts with one ``readlink`` of the folder's ``current`` link; when a change was
    published since, the new version is opened (the query encoder is reused) and serves this
    search and every later one. A search already running finishes on the version it started
    with, which stays on disk until then; the last search on an old version lets go of it. If the
    new version cannot be opened, the error is logged and the old one keeps serving.
    """

    def __init__(self, folder: str | Path, mode: Mode = "dense", *, device: str = "auto",
                 embedder: Embedder | None = None, fusion: dict[str, Any] | None = None, **kwargs: Any):
        self.folder, self.mode, self.device, self.fusion = Path(folder), mode, device, fusion
        self._kwargs = kwargs
        self._lock = threading.Lock()
        self._users: dict[int, int] = {}  # id(retriever) -> searches running on it; guarded by _lock
        self._retired: list[_Base] = []  # replaced, closed when their last search ends; guarded by _lock
        self._failed: Version | None = None
        self.current = open_retriever(self.folder, mode, device=device, embedder=embedder, fusion=fusion, **kwargs)
        self.embedder = query_embedder(self.current) or embedder

    @property
    def store(self) -> PassageStore:
        return self.current.store

    @property
    def version(self) -> Version | None:
        return self.current.version

    def describe(self) -> IndexInfo:
        """The newest published version (opened now if a change was published since)."""
        self.refresh()
        return self.current.describe().model_copy(update={"follows": True})

    def refresh(self) -> bool:
        """Open the newest version if it is not the one served; True if it switched."""
        served = self.current
        if not served.stale():
            return False
        with self._lock:
            if self.current is not served:
                return True  # another search switched meanwhile
            try:
                new = open_retriever(self.folder, self.mode, device=self.device, embedder=self.embedder,
                                     fusion=self.fusion, **self._kwargs)
            except RagError as e:
                if self._failed != served.version:
                    log.error("%s: keeping version %s; the newly published one cannot be opened: %s",
                              self.folder, served.version.number if served.version else "(shards)", e)
                self._failed = served.version
                return False
            self.current = new
            self._retired.append(served)
            self._close_idle()
        log.info("%s: now serving version %s", self.folder, new.version.number if new.version else "?")
        return True

    def _close_idle(self) -> None:
        for r in [r for r in self._retired if not self._users.get(id(r))]:
            self._retired.remove(r)
            r.close()

    def search_batch(self, queries: Sequence[str], top_k: int = 10, *, filter: Filter | None = None,
                     **kwargs: Any) -> list[list[Hit]]:
        self.refresh()
        with self._lock:
            r = self.current
            self._users[id(r)] = self._users.get(id(r), 0) + 1
        try:
            return r.search_batch(queries, top_k, filter=filter, **kwargs)
        finally:
            with self._lock:
                self._users[id(r)] -= 1
                if not self._users[id(r)]:
                    del self._users[id(r)]
                self._close_idle()

    def search(self, query: str, top_k: int = 10, *, filter: Filter | None = None) -> list[Hit]:
        return self.search_batch([query], top_k, filter=filter)[0]

    def close(self) -> None:
        with self._lock:
            for r in [*self._retired, self.current]:
                r.close()
            self._retired.clear()


def query_embedder(retriever: Retriever) -> Embedder | None:
    """The encoder a retriever's dense search embeds queries with (None: it has no dense part)."""
    if isinstance(retriever, FollowingRetriever):
        return retriever.embedder
    if isinstance(retriever, HybridRetriever):
        retriever = retriever.dense
    return getattr(retriever, "embedder", None)  # dense (one folder or its shards); None for BM25


def sibling_retriever(retriever: Retriever, mode: Mode, *, device: str = "auto",
                      fusion: dict[str, Any] | None = None) -> Retriever:
    """A retriever of another mode over the same index folder, reusing the parts ``retriever``
    already has (its encoder and FAISS index, its BM25 model; a following retriever's encoder)."""
    if isinstance(retriever, FollowingRetriever):
        return FollowingRetriever(retriever.folder, mode, device=device, embedder=retriever.embedder, fusion=fusion)
    dense = retriever.dense if isinstance(retriever, HybridRetriever) else retriever
    bm25 = retriever.bm25 if isinstance(retriever, HybridRetriever) else retriever
    folder = getattr(dense, "folder", None)
    if folder is None:
        raise ConfigError(f"{type(retriever).__name__} has no index folder; only the pipeline's own "
                          "retrieval mode can be searched")
    if is_sharded(folder):
        return open_retriever(folder, mode, device=device, embedder=query_embedder(retriever), fusion=fusion)

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
                   **kwargs: Any) -> FollowingRetriever:
    """A retriever over an index folder that follows its changes: ``dense``, ``bm25`` or
    ``hybrid`` (``fusion``: the keyword arguments of `HybridRetriever`)."""
    return FollowingRetriever(folder, mode, device=device, embedder=embedder, fusion=fusion, **kwargs)
