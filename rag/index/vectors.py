"""Vector indexes behind one protocol: `FaissIndex` (FAISS on CPU, GPU clones when present) and
`NumpyFlatIndex` (exact search in numpy, for tests and tiny corpora).

Rows are the index's labels: row ``i`` of the passage store is vector ``i``. ``exclude`` drops
rows (deleted passages) from a search; ``rows`` restricts it to a subset (metadata filters).
Both are exact: FAISS applies them inside the search as an ID selector on CPU; a GPU search
fetches ``k`` plus the excluded count and drops them (still the exact top ``k``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from rag.errors import ConfigError, missing_extra

log = logging.getLogger(__name__)

GPU_MAX_K = 2048  # faiss-gpu's limit on k (and nprobe)
Rows = Sequence[int] | np.ndarray


@runtime_checkable
class VectorIndex(Protocol):
    """What a dense retriever needs of a vector index."""

    metric: str

    @property
    def ntotal(self) -> int: ...

    @property
    def dim(self) -> int: ...

    def add(self, vectors: np.ndarray) -> None: ...

    def search(self, queries: np.ndarray, k: int, *, nprobe: int | None = None,
               ef_search: int | None = None, rows: Rows | None = None,
               exclude: Rows | None = None) -> tuple[np.ndarray, np.ndarray]: ...

    def vectors(self, rows: Rows) -> np.ndarray: ...

    def save(self, path: str | Path) -> None: ...


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise missing_extra("faiss", "cpu' (or 'gpu") from None
    return faiss


def gpu_count(faiss: Any) -> int:
    """GPUs faiss can use (0 for faiss-cpu builds)."""
    get = getattr(faiss, "get_num_gpus", None)
    try:
        return int(get()) if get else 0
    except Exception:  # a CUDA build on a machine without a driver
        return 0


def _is_gpu_oom(err: Exception) -> bool:
    msg = str(err).lower()
    return "out of memory" in msg or "cudaerrormemoryallocation" in msg or "cudamalloc" in msg


class FaissIndex:
    """A FAISS index with GPU placement, CPU fallback and per-query search parameters.

    The CPU index is always kept; a GPU clone is made when ``device`` allows it. Searches use the
    GPU clone except when k exceeds faiss-gpu's limit, when a filter is given (GPU indexes take
    no ID selector) or after a GPU out-of-memory error; each fallback is logged.
    """

    def __init__(self, index: Any, *, metric: str = "ip", device: str = "auto"):
        self.faiss = import_faiss()
        self.cpu_index = index
        self.metric = metric
        self.gpu_index: Any = None
        self._gpu_resources: Any = None
        if device not in ("auto", "cpu", "gpu"):
            raise ConfigError(f"device must be auto, cpu or gpu, got {device!r}")
        ngpu = gpu_count(self.faiss)
        if device == "gpu" and ngpu == 0:
            raise ConfigError("device 'gpu' asked for, but faiss sees no GPU; install the 'gpu' "
                              "extra (faiss-gpu-cu12) on a CUDA machine or use device 'cpu'")
        if device != "cpu" and ngpu > 0:
            self._to_gpu(ngpu)

    @classmethod
    def create(cls, dim: int, factory: str, metric: str = "ip", device: str = "auto") -> FaissIndex:
        faiss = import_faiss()
        faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
        try:
            index = faiss.index_factory(dim, factory, faiss_metric)
        except RuntimeError as e:
            reason = " ".join(str(e).split()).rsplit(": ", 1)[-1]
            raise ConfigError(f"invalid FAISS factory string {factory!r} ({reason}); examples: "
                              "Flat, HNSW32, IVF1024,Flat, IVF4096,PQ64") from None
        return cls(index, metric=metric, device=device)

    @classmethod
    def load(cls, path: str | Path, *, metric: str = "ip", device: str = "auto",
             mmap: bool = False) -> FaissIndex:
        faiss = import_faiss()
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        try:
            index = faiss.read_index(str(path), flags)
        except RuntimeError as e:
            from rag.index.folder import damaged

            reason = " ".join(str(e).split()).rsplit("Error: ", 1)[-1][:160]
            raise damaged(Path(path), f"FAISS cannot read it ({reason})") from None
        return cls(index, metric=metric, device=device)

    def _to_gpu(self, ngpu: int) -> None:
        faiss = self.faiss
        try:
            if ngpu == 1:
                self._gpu_resources = faiss.StandardGpuResources()
                self.gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self.cpu_index)
            else:
                co = faiss.GpuMultipleClonerOptions()
                co.shard = True  # split vectors across GPUs instead of replicating them
                self.gpu_index = faiss.index_cpu_to_all_gpus(self.cpu_index, co=co, ngpu=ngpu)
        except RuntimeError as e:  # unsupported on GPU (HNSW) or no memory: stay on CPU
            log.warning("keeping the index on CPU (GPU clone failed: %s)", str(e).strip()[:200])
            self.gpu_index = None

    @property
    def on_gpu(self) -> bool:
        return self.gpu_index is not None

    @property
    def ntotal(self) -> int:
        return int(self.cpu_index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.cpu_index.d)

    @property
    def is_trained(self) -> bool:
        return bool(self.cpu_index.is_trained)

    def _sync_to_cpu(self) -> None:
        if self.gpu_index is not None:
            self.cpu_index = self.faiss.index_gpu_to_cpu(self.gpu_index)

    def train(self, vectors: np.ndarray) -> None:
        (self.gpu_index or self.cpu_index).train(np.ascontiguousarray(vectors, dtype=np.float32))
        self._sync_to_cpu()

    def add(self, vectors: np.ndarray) -> None:
        (self.gpu_index or self.cpu_index).add(np.ascontiguousarray(vectors, dtype=np.float32))

    def save(self, path: str | Path) -> None:
        """Write through a CPU copy, atomically (temp file + rename)."""
        self._sync_to_cpu()
        tmp = Path(str(path) + ".tmp")
        self.faiss.write_index(self.cpu_index, str(tmp))
        os.replace(tmp, path)

    def _params(self, index: Any, nprobe: int | None, ef_search: int | None, rows: Any) -> Any:
        faiss = self.faiss
        ivf = faiss.try_extract_index_ivf(index) if hasattr(faiss, "try_extract_index_ivf") else None
        if ivf is not None:
            params = faiss.SearchParametersIVF()
            params.nprobe = nprobe or ivf.nprobe
        elif isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
            params = faiss.SearchParametersHNSW()
            params.efSearch = ef_search or faiss.downcast_index(index).hnsw.efSearch
        else:
            params = faiss.SearchParameters()
        if rows is not None:
            params.sel = rows
        return params

    def search(self, queries: np.ndarray, k: int, *, nprobe: int | None = None,
               ef_search: int | None = None, rows: Rows | None = None,
               exclude: Rows | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, rows) for each query row; rows are -1 where fewer exist.

        Args:
            queries: float32 (n, dim).
            nprobe / ef_search: IVF / HNSW search breadth for this call only.
            rows: restrict results to these rows (metadata filters).
            exclude: rows never to return (deleted passages).
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        excluded = np.asarray(exclude if exclude is not None else [], dtype=np.int64)
        if rows is not None and len(excluded):
            rows = np.setdiff1d(np.asarray(rows, np.int64), excluded)
            excluded = excluded[:0]
        if self.gpu_index is not None:
            fetch = k + len(excluded)
            if fetch > GPU_MAX_K or rows is not None:
                log.warning("searching on CPU: %s", "filters are not supported on GPU" if rows is not None
                            else "k > 2048 (counting deleted rows) is beyond faiss-gpu")
            else:
                try:
                    if nprobe:
                        self.faiss.GpuParameterSpace().set_index_parameter(self.gpu_index, "nprobe", nprobe)
                    scores, ids = self.gpu_index.search(q, fetch)
                    return _drop(scores, ids, excluded, k) if len(excluded) else (scores, ids)
                except RuntimeError as e:
                    if not _is_gpu_oom(e):
                        raise
                    log.warning("GPU out of memory during search; falling back to CPU")
        faiss, selector, inner = self.faiss, None, None
        if rows is not None:
            selector = faiss.IDSelectorBatch(np.asarray(rows, dtype=np.int64))
        elif len(excluded):
            inner = faiss.IDSelectorBatch(excluded)
            selector = faiss.IDSelectorNot(inner)
        params = self._params(self.cpu_index, nprobe, ef_search, selector)
        scores, ids = self.cpu_index.search(q, k, params=params)
        del inner  # the selector pointed at it until here
        return scores, ids

    def vectors(self, rows: Rows) -> np.ndarray:
        """The stored vectors of ``rows`` (exact for Flat, HNSW and IVF-Flat; PQ/SQ codes decode
        to approximations)."""
        ivf = self.faiss.try_extract_index_ivf(self.cpu_index)
        if ivf is not None and not ivf.direct_map.type:
            ivf.make_direct_map()
        ids = np.asarray(rows, dtype=np.int64)
        if not len(ids):
            return np.zeros((0, self.dim), np.float32)
        return np.asarray(self.cpu_index.reconstruct_batch(ids), dtype=np.float32)


def _drop(scores: np.ndarray, ids: np.ndarray, excluded: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` results of each row that are not ``excluded`` (order kept)."""
    out_s = np.full((len(ids), k), np.nan, np.float32)
    out_i = np.full((len(ids), k), -1, np.int64)
    for r, (srow, irow) in enumerate(zip(scores, ids, strict=True)):
        keep = ~np.isin(irow, excluded) & (irow >= 0)
        n = min(k, int(keep.sum()))
        out_s[r, :n], out_i[r, :n] = srow[keep][:n], irow[keep][:n]
    return out_s, out_i


class NumpyFlatIndex:
    """Exact inner-product or L2 search over a float32 matrix (``.npy`` on disk)."""

    def __init__(self, matrix: np.ndarray | None = None, *, dim: int | None = None, metric: str = "ip"):
        if matrix is None:
            matrix = np.zeros((0, dim or 0), np.float32)
        self.matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        self.metric = metric

    @classmethod
    def load(cls, path: str | Path, *, metric: str = "ip") -> NumpyFlatIndex:
        return cls(np.load(path), metric=metric)

    @property
    def ntotal(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def add(self, vectors: np.ndarray) -> None:
        self.matrix = np.concatenate([self.matrix, np.asarray(vectors, np.float32)])

    def vectors(self, rows: Rows) -> np.ndarray:
        return self.matrix[np.asarray(rows, dtype=np.int64)]

    def search(self, queries: np.ndarray, k: int, *, nprobe: int | None = None,
               ef_search: int | None = None, rows: Rows | None = None,
               exclude: Rows | None = None) -> tuple[np.ndarray, np.ndarray]:
        q = np.asarray(queries, np.float32)
        if self.metric == "ip":
            scores = q @ self.matrix.T
        else:
            scores = -(np.sum(q**2, 1)[:, None] - 2 * q @ self.matrix.T + np.sum(self.matrix**2, 1)[None, :])
        allowed = np.ones(self.ntotal, bool)
        if rows is not None:
            allowed[:] = False
            allowed[np.asarray(rows, np.int64)] = True
        if exclude is not None and len(exclude):
            allowed[np.asarray(exclude, np.int64)] = False
        scores = np.where(allowed[None, :], scores, -np.inf)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(scores, order, 1)
        ids = np.where(np.isfinite(top), order, -1)
        out = np.where(np.isfinite(top), top, -np.inf if self.metric == "ip" else np.inf)
        if self.metric == "l2":
            out = -out  # distances, as FAISS returns them
        pad = max(0, k - ids.shape[1])
        if pad:
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
            out = np.pad(out, ((0, 0), (0, pad)), constant_values=np.nan)
        return out.astype(np.float32), ids.astype(np.int64)

    def save(self, path: str | Path) -> None:
        tmp = Path(str(path) + ".tmp.npy")
        np.save(tmp, self.matrix)
        os.replace(tmp, path)
