"""FAISS index folders: build (streaming, resumable, atomic), append, load, search.

Folder layout (``indexes/<name>/``)::

    index.faiss     the FAISS index (always written from a CPU copy)
    passages.db     PassageStore (SQLite); row i <-> vector i
    manifest.json   embedder identity, factory, metric, counts, corpus fingerprints, versions
    report.json     what the build read: passages, empty texts skipped, bad lines skipped

A build works in ``<out>.partial/``: each batch's embeddings are written as a shard file, then
its passages and the progress counter are committed to the store in one transaction. A crash
(Ctrl-C, kill -9) therefore loses at most the batch in flight; running the same build again
skips what was done. The finished folder replaces ``<out>`` by rename.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from rag.config import IndexRecipe
from rag.corpus import ReadReport, Record, corpus_fingerprint, iter_records
from rag.embedding import Embedder, identity, load_embedder, passage_text
from rag.errors import ConfigError, IndexMismatchError, IndexNotFoundError, missing_extra
from rag.store import PassageStore

if TYPE_CHECKING:
    from rag.distributed import RayOptions

log = logging.getLogger(__name__)

INDEX_FILE, STORE_FILE, MANIFEST_FILE, REPORT_FILE = (
    "index.faiss", "passages.db", "manifest.json", "report.json")
GPU_MAX_K = 2048  # faiss-gpu's limit on k (and nprobe)
FORMAT_VERSION = 1


class Manifest(BaseModel):
    """What an index folder was built from; checked whenever the index is loaded."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    name: str
    embedder: dict[str, Any]
    factory: str
    metric: str
    passages: int
    corpora: list[dict[str, Any]]
    versions: dict[str, str]
    built_at: str
    build_seconds: float
    build_key: str = ""


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
        return cls(faiss.read_index(str(path), flags), metric=metric, device=device)

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
               ef_search: int | None = None, rows: Sequence[int] | None = None,
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, rows) for each query row; rows are -1 where fewer exist.

        Args:
            queries: float32 (n, dim).
            nprobe / ef_search: IVF / HNSW search breadth for this call only.
            rows: restrict results to these store rows (metadata filters).
        """
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self.gpu_index is not None:
            if k > GPU_MAX_K or rows is not None:
                log.warning("searching on CPU: %s", "k > 2048 is beyond faiss-gpu"
                            if k > GPU_MAX_K else "filters are not supported on GPU")
            else:
                try:
                    if nprobe:
                        self.faiss.GpuParameterSpace().set_index_parameter(
                            self.gpu_index, "nprobe", nprobe)
                    scores, ids = self.gpu_index.search(q, k)
                    return scores, ids
                except RuntimeError as e:
                    if not _is_gpu_oom(e):
                        raise
                    log.warning("GPU out of memory during search; falling back to CPU")
        selector = None
        if rows is not None:
            selector = self.faiss.IDSelectorBatch(np.asarray(rows, dtype=np.int64))
        params = self._params(self.cpu_index, nprobe, ef_search, selector)
        scores, ids = self.cpu_index.search(q, k, params=params)
        return scores, ids


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for dist in ("rag-pipeline", "faiss-cpu", "faiss-gpu-cu12", "sentence-transformers", "torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _atomic_write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_manifest(folder: str | Path) -> Manifest:
    path = Path(folder) / MANIFEST_FILE
    if not path.exists():
        hint = " (a build is in progress or was interrupted: run the same build again to resume)" \
            if Path(str(folder) + ".partial").exists() else ""
        raise IndexNotFoundError(f"no index at {folder}: {MANIFEST_FILE} missing{hint}; "
                                 "build one with 'rag index build'")
    return Manifest.model_validate_json(path.read_text(encoding="utf-8"))


def check_embedder(manifest: Manifest, embedder: Embedder, folder: str | Path) -> None:
    """Refuse an embedder that differs from the one the index was built with."""
    built, got = manifest.embedder, identity(embedder)
    diffs = [f"{k}: index has {built.get(k)!r}, got {got[k]!r}" for k in got
             if k != "precision" and built.get(k) != got[k]]
    if built.get("precision", "fp32") != got["precision"]:
        # compatible (same model, embeddings agree to ~0.998 cosine) but worth knowing
        log.warning("index %s was built at %s precision; queries are encoded at %s",
                    folder, built.get("precision", "fp32"), got["precision"])
    if diffs:
        raise IndexMismatchError(
            f"index {folder} was built with a different embedder ({'; '.join(diffs)}). "
            f"Query it with --embedder {built.get('name')} (the default), or rebuild it: "
            f"rag index build --corpus ... --out {folder} --embedder {got['name']}")


def embedder_for(recipe: IndexRecipe) -> Embedder:
    return load_embedder(recipe.embedder, normalize=recipe.normalize,
                         query_prompt=recipe.query_prompt, passage_prompt=recipe.passage_prompt,
                         precision=recipe.precision)


def embedder_from_manifest(manifest: Manifest, **overrides: Any) -> Embedder:
    """The embedder an index was built with, at its precision (``overrides``: device,
    batch_size, precision...)."""
    e = manifest.embedder
    kw = {"normalize": e["normalize"], "query_prompt": e["query_prompt"],
          "passage_prompt": e["passage_prompt"], "precision": e.get("precision", "fp32"), **overrides}
    return load_embedder(e["name"], **kw)


def _progress(total: int | None, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="psg", file=sys.stderr, dynamic_ncols=True,
                disable=not enabled or not sys.stderr.isatty(), initial=0)


def _batches(records: Iterator[Record], size: int) -> Iterator[list[Record]]:
    batch: list[Record] = []
    for rec in records:
        batch.append(rec)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _batches_after(records: Iterator[Record], size: int, done: int) -> Iterator[tuple[list[Record], int]]:
    """Batches of the records after the first ``done`` (an earlier run's), each with the count
    of records done once it is committed."""
    for batch in _batches(itertools.islice(records, done, None), size):
        done += len(batch)
        yield batch, done


def _commit(store: PassageStore, batch: list[Record], records_done: int, key: str) -> None:
    """Add a batch's passages (with where they came from) and the resume point in one step."""
    store.add([r.passage for r in batch], state={"records_done": str(records_done), "key": key},
              locations=[f"{r.source}:{r.line}" if r.line else r.source for r in batch])


class _Shards:
    """Embedding checkpoints: ``emb/<first row>.npy``, written atomically."""

    def __init__(self, folder: Path):
        self.dir = folder / "emb"
        self.dir.mkdir(parents=True, exist_ok=True)

    def write(self, start_row: int, vectors: np.ndarray) -> None:
        tmp = self.dir / f"{start_row:012d}.tmp.npy"
        np.save(tmp, vectors)
        os.replace(tmp, self.dir / f"{start_row:012d}.npy")

    def drop_from(self, row: int) -> None:
        """Delete shards at or past ``row`` (written but never committed before a crash)."""
        for f in self.dir.glob("*.npy"):
            if ".tmp" in f.name or int(f.stem) >= row:
                f.unlink()

    def iter(self, start: int, end: int) -> Iterator[np.ndarray]:
        expected = start
        for f in sorted(self.dir.glob("*.npy")):
            row = int(f.stem)
            if row < start:
                continue
            if row != expected:
                raise IndexNotFoundError(f"embedding checkpoint for row {expected} missing in "
                                         f"{self.dir}; delete the .partial folder and rebuild")
            vecs = np.load(f)
            expected += len(vecs)
            yield vecs
        if expected != end:
            raise IndexNotFoundError(f"embedding checkpoints cover rows {start}..{expected}, "
                                     f"store has {end}; delete the .partial folder and rebuild")

    def sample(self, start: int, end: int, n: int, seed: int = 0) -> np.ndarray:
        """A uniform sample of ``n`` vectors (all when fewer), reading one shard at a time."""
        total = end - start
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(total, size=min(n, total), replace=False))
        parts, offset = [], 0
        for vecs in self.iter(start, end):
            sel = chosen[(chosen >= offset) & (chosen < offset + len(vecs))] - offset
            parts.append(vecs[sel])
            offset += len(vecs)
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def _train_size(index: Any, recipe: IndexRecipe) -> int:
    if recipe.train_size:
        return recipe.train_size
    faiss = import_faiss()
    ivf = faiss.try_extract_index_ivf(index)
    nlist = int(ivf.nlist) if ivf is not None else 256
    return max(100 * nlist, 65_536)


def _encode_into(partial: Path, store: PassageStore, records: Iterator[Record],
                 embedder: Embedder, recipe: IndexRecipe, key: str, progress: bool) -> int:
    """Encode records into shards + store, resuming after what the store already holds.

    Returns the number of records skipped because an earlier run had done them.
    """
    done = int(store.get_state("records_done") or 0)
    shards = _Shards(partial)
    shards.drop_from(len(store))
    if done:
        log.info("resuming build: %d passages already encoded", done)
    bar = _progress(None, f"encoding {recipe.name}", progress)
    bar.update(done)
    try:
        for batch, records_done in _batches_after(records, recipe.batch_size, done):
            vecs = embedder.encode_passages([passage_text(r.passage.title, r.passage.text)
                                             for r in batch])
            shards.write(len(store), vecs)
            _commit(store, batch, records_done, key)
            bar.update(len(batch))
    finally:
        bar.close()
    return done


def _publish(partial: Path, out: Path) -> None:
    """Replace ``out`` with the finished ``partial`` folder."""
    shutil.rmtree(partial / "emb", ignore_errors=True)
    shutil.rmtree(partial / "todo", ignore_errors=True)  # ray builds' window texts
    for leftover in partial.glob("passages.db-*"):  # SQLite WAL/SHM, checkpointed on close
        leftover.unlink()
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
    os.rename(partial, out)
    shutil.rmtree(old, ignore_errors=True)


def _build_key(recipe: IndexRecipe, embedder: Embedder, fingerprint: str) -> str:
    import hashlib

    ident = {k: v for k, v in identity(embedder).items() if k != "dim"}
    parts = [fingerprint, recipe.format, recipe.factory, recipe.metric, recipe.chunk_size,
             recipe.chunk_stride, recipe.skip_bad_lines, json.dumps(ident, sort_keys=True)]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def build_index(recipe: IndexRecipe, *, embedder: Embedder | None = None,
                progress: bool = True, force: bool = False, ray: RayOptions | None = None) -> Manifest:
    """Build ``recipe.out_dir()`` from the corpus; resume an interrupted build of the same recipe.

    An existing index built from the same corpus bytes and settings is kept as it is unless
    ``force`` is given. ``ray`` spreads the encoding over a Ray cluster (`rag.distributed`);
    the result is the same index.

    Raises:
        CorpusError: malformed record (file:line), duplicate id.
        ConfigError: bad factory string or device.
    """
    t0 = time.time()
    out = recipe.out_dir()
    partial = out.with_name(out.name + ".partial")
    embedder = embedder or embedder_for(recipe)
    fingerprint = corpus_fingerprint(recipe.corpus, recipe.format)
    key = _build_key(recipe, embedder, fingerprint)
    if not force and (out / MANIFEST_FILE).exists() and (out / INDEX_FILE).exists():
        existing = read_manifest(out)
        if existing.build_key == key:
            log.info("%s is up to date", out)
            return existing
    mode = "ray" if ray else "local"
    if partial.exists():
        with PassageStore(partial / STORE_FILE) as old:
            stale = old.get_state("key") not in (None, key) or old.get_state("mode") not in (None, mode)
        if stale:
            log.warning("discarding %s: it was started with another corpus, settings or --ray", partial)
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    report = ReadReport()
    records = iter_records(recipe.corpus, recipe.format, chunk_size=recipe.chunk_size,
                           chunk_stride=recipe.chunk_stride, skip_bad_lines=recipe.skip_bad_lines,
                           report=report)
    with PassageStore(partial / STORE_FILE) as store:
        store.set_state("key", key)
        store.set_state("mode", mode)
        if ray:
            from rag.distributed import encode_with_ray

            spec = {k: v for k, v in identity(embedder).items() if k != "dim"}
            encode_with_ray(partial, store, records, spec, recipe.batch_size, key, ray, progress)
        else:
            _encode_into(partial, store, records, embedder, recipe, key, progress)
        count = len(store)
    index = FaissIndex.create(embedder.dim, recipe.factory, recipe.metric, recipe.device)
    shards = _Shards(partial)
    if not index.is_trained:
        sample = shards.sample(0, count, _train_size(index.cpu_index, recipe))
        if len(sample) == 0:
            raise ConfigError(f"{recipe.factory} needs training vectors but the corpus is empty")
        log.info("training %s on %d vectors", recipe.factory, len(sample))
        try:
            index.train(sample)
        except RuntimeError as e:
            reason = " ".join(str(e).split())[-300:]
            raise ConfigError(f"cannot train {recipe.factory} on {len(sample)} vectors ({reason}); "
                              "use fewer lists/centroids or a larger corpus") from None
    for vecs in shards.iter(0, count):
        index.add(vecs)
    index.save(partial / INDEX_FILE)
    manifest = Manifest(
        name=recipe.name, embedder=identity(embedder), factory=recipe.factory,
        metric=recipe.metric, passages=count,
        corpora=[{"path": str(recipe.corpus), "format": recipe.format, "fingerprint": fingerprint,
                  "passages": count}],
        versions=_versions(), built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        build_seconds=round(time.time() - t0, 3), build_key=key)
    _atomic_write_json(partial / REPORT_FILE, {"corpora": [report.to_json()]})
    _atomic_write_json(partial / MANIFEST_FILE, manifest.model_dump())
    _publish(partial, out)
    log.info("built %s: %d passages in %.1fs", out, count, manifest.build_seconds)
    return manifest


def add_to_index(folder: str | Path, corpus: str, *, format: str = "auto",
                 embedder: Embedder | None = None, batch_size: int = 256,
                 skip_bad_lines: bool = False, progress: bool = True) -> Manifest:
    """Append a corpus to an existing index without rebuilding (no retraining of IVF/PQ).

    Works on a copy of the folder and swaps it in when done, so readers never see a half
    appended index; an interrupted append resumes like a build.
    """
    t0 = time.time()
    out = Path(folder)
    manifest = read_manifest(out)
    embedder = embedder or embedder_from_manifest(manifest)
    check_embedder(manifest, embedder, out)
    fingerprint = corpus_fingerprint(corpus, format)
    recipe = IndexRecipe(name=manifest.name, corpus=corpus, format=format, out=str(out),
                         embedder=embedder.name, factory=manifest.factory,
                         metric=manifest.metric, batch_size=batch_size,  # type: ignore[arg-type]
                         skip_bad_lines=skip_bad_lines)
    key = "add-" + _build_key(recipe, embedder, fingerprint)
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        with PassageStore(partial / STORE_FILE) as old:
            stale = old.get_state("key") != key
        if stale:
            shutil.rmtree(partial)
    if not partial.exists():
        tmp = out.with_name(out.name + ".partial.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(out, tmp)
        with PassageStore(tmp / STORE_FILE) as store:
            store.add([], state={"key": key, "records_done": "0", "base": str(len(store))})
        os.rename(tmp, partial)
    report = ReadReport()
    records = iter_records(corpus, format, skip_bad_lines=skip_bad_lines, report=report)
    with PassageStore(partial / STORE_FILE) as store:
        base = int(store.get_state("base") or 0)
        _encode_into(partial, store, records, embedder, recipe, key, progress)
        count = len(store)
    index = FaissIndex.load(partial / INDEX_FILE, metric=manifest.metric)
    if index.ntotal != base:
        raise IndexNotFoundError(f"{out}: index holds {index.ntotal} vectors but the store had "
                                 f"{base} passages; rebuild the index")
    for vecs in _Shards(partial).iter(base, count):
        index.add(vecs)
    index.save(partial / INDEX_FILE)
    updated = manifest.model_copy(update={
        "passages": count,
        "corpora": manifest.corpora + [{"path": corpus, "format": format,
                                        "fingerprint": fingerprint, "passages": count - base}],
        "versions": _versions(), "build_seconds": round(manifest.build_seconds + time.time() - t0, 3),
        "build_key": "",
    })
    prev = json.loads((partial / REPORT_FILE).read_text()) if (partial / REPORT_FILE).exists() else {}
    _atomic_write_json(partial / REPORT_FILE,
                       {"corpora": prev.get("corpora", []) + [report.to_json()]})
    _atomic_write_json(partial / MANIFEST_FILE, updated.model_dump())
    _publish(partial, out)
    return updated


def folder_size(folder: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
