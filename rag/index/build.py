"""Local index builds (streaming, resumable, atomic) and appends; ``ray`` spreads the encoding.

A build holds the folder's writer lock (`rag.index.owner.writing`), works in
``<out>/.work/<key>/`` with the checkpoints of `rag.index.checkpoints`, and publishes the
finished folder as the next version (`rag.index.folder.finish`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rag.config import IndexRecipe
from rag.corpus import ReadReport, corpus_fingerprint, iter_records
from rag.embedding import Embedder, identity
from rag.errors import ConfigError, CorpusError
from rag.index.checkpoints import Shards, encode_into
from rag.index.folder import (
    INDEX_FILE,
    REPORT_FILE,
    STORE_FILE,
    Manifest,
    atomic_write_json,
    embedder_for,
    finish,
    load_manifest,
    resume_finished,
    verify,
    versions,
)
from rag.index.owner import writing
from rag.index.update import resolve_corpus
from rag.index.vectors import FaissIndex, import_faiss
from rag.store import PassageStore

if TYPE_CHECKING:
    from rag.index.ray import RayOptions

log = logging.getLogger(__name__)


def train_size(index: Any, recipe: IndexRecipe) -> int:
    if recipe.train_size:
        return recipe.train_size
    faiss = import_faiss()
    ivf = faiss.try_extract_index_ivf(index)
    nlist = int(ivf.nlist) if ivf is not None else 256
    return max(100 * nlist, 65_536)



def build_key(recipe: IndexRecipe, embedder: Embedder, fingerprint: str) -> str:
    ident = {k: v for k, v in identity(embedder).items() if k != "dim"}
    parts = [fingerprint, recipe.format, recipe.factory, recipe.metric, recipe.chunk_size,
             recipe.chunk_stride, recipe.skip_bad_lines, json.dumps(ident, sort_keys=True)]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def build_index(recipe: IndexRecipe, *, embedder: Embedder | None = None, progress: bool = True,
                force: bool = False, ray: RayOptions | None = None, wait: float = 0.0) -> Manifest:
    """Build ``recipe.out_dir()`` from the corpus; resume an interrupted build of the same recipe.

    An intact index built from the same corpus bytes and settings is kept as it is unless
    ``force`` is given. ``ray`` spreads the encoding over a Ray cluster (`rag.distributed`);
    the result is the same index. ``wait``: seconds to wait for another writer of the folder.

    Raises:
        CorpusError: malformed record (file:line), duplicate id, no passages.
        ConfigError: bad factory string or device.
        IndexBusyError: another process is changing the folder.
    """
    t0 = time.time()
    out = recipe.out_dir()
    embedder = embedder or embedder_for(recipe)
    corpus = resolve_corpus(recipe.corpus)
    fingerprint = corpus_fingerprint(corpus, recipe.format)
    key = build_key(recipe, embedder, fingerprint)
    work_key = f"build-{key}-{'ray' if ray else 'local'}"
    with writing(out, "build", wait=wait, create=True) as w:
        current = w.current
        if not force and current is not None:
            existing = load_manifest(current.path)
            if existing.build_key == key and not verify(out):
                log.info("%s is up to date", out)
                w.tidy()
                return existing
        if (done := resume_finished(w, work_key)) is not None:
            return done
        work = w.work(work_key)
        report = ReadReport()
        records = iter_records(corpus, recipe.format, chunk_size=recipe.chunk_size,
                               chunk_stride=recipe.chunk_stride, skip_bad_lines=recipe.skip_bad_lines,
                               report=report)
        with PassageStore(work / STORE_FILE) as store:
            store.set_state("key", work_key)
            if ray:
                from rag.index.ray import encode_with_ray

                spec = {k: v for k, v in identity(embedder).items() if k != "dim"}
                encode_with_ray(work, store, records, spec, recipe.batch_size, work_key, ray, progress)
            else:
                encode_into(work, store, records, embedder, recipe.batch_size, recipe.name, work_key, progress)
            count = len(store)
        if count == 0:
            raise CorpusError(f"no passages to index ({report.empty_skipped} empty texts and "
                              f"{len(report.bad_lines)} bad lines skipped); check the path and --format",
                              source=corpus)
        index = _index_of(work, recipe, embedder.dim, count)
        index.save(work / INDEX_FILE)
        manifest = Manifest(
            name=recipe.name, embedder=identity(embedder), factory=recipe.factory,
            metric=recipe.metric, passages=count,
            corpora=[{"path": corpus, "format": recipe.format, "fingerprint": fingerprint,
                      "passages": count, "chunk_size": recipe.chunk_size, "chunk_stride": recipe.chunk_stride}],
            versions=versions(), built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            build_seconds=round(time.time() - t0, 3), build_key=key)
        atomic_write_json(work / REPORT_FILE, {"corpora": [report.to_json()]})
        manifest = finish(w, work, manifest, work_key)
    log.info("built %s: %d passages in %.1fs", out, count, manifest.build_seconds)
    return manifest


def _index_of(work: Path, recipe: IndexRecipe, dim: int, count: int) -> FaissIndex:
    """The FAISS index of the work folder's embedding shards (trained first if it needs it)."""
    index = FaissIndex.create(dim, recipe.factory, recipe.metric, recipe.device)
    shards = Shards(work)
    if not index.is_trained:
        sample = shards.sample(0, count, train_size(index.cpu_index, recipe))
        log.info("training %s on %d vectors", recipe.factory, len(sample))
        try:
            index.train(sample)
        except RuntimeError as e:
            reason = " ".join(str(e).split())[-300:]
            raise ConfigError(f"cannot train {recipe.factory} on {len(sample)} vectors ({reason}); "
                              "use fewer lists/centroids or a larger corpus") from None
    for vecs in shards.iter(0, count):
        index.add(vecs)
    return index
