"""Local index builds (streaming, resumable, atomic) and appends; ``ray`` spreads the encoding.

A build works in ``<out>.partial/`` with the checkpoints of `rag.index.checkpoints`; the
finished folder replaces ``<out>`` by `rag.index.folder.publish`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from typing import TYPE_CHECKING, Any

from rag.config import IndexRecipe
from rag.corpus import ReadReport, corpus_fingerprint, iter_records
from rag.embedding import Embedder, identity
from rag.errors import ConfigError
from rag.index.checkpoints import Shards, encode_into
from rag.index.folder import (
    INDEX_FILE,
    MANIFEST_FILE,
    REPORT_FILE,
    STORE_FILE,
    Manifest,
    atomic_write_json,
    embedder_for,
    publish,
    read_manifest,
    versions,
    write_manifest,
)
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
    key = build_key(recipe, embedder, fingerprint)
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
            from rag.index.ray import encode_with_ray

            spec = {k: v for k, v in identity(embedder).items() if k != "dim"}
            encode_with_ray(partial, store, records, spec, recipe.batch_size, key, ray, progress)
        else:
            encode_into(partial, store, records, embedder, recipe.batch_size, recipe.name, key, progress)
        count = len(store)
    index = FaissIndex.create(embedder.dim, recipe.factory, recipe.metric, recipe.device)
    shards = Shards(partial)
    if not index.is_trained:
        sample = shards.sample(0, count, train_size(index.cpu_index, recipe))
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
                  "passages": count, "chunk_size": recipe.chunk_size, "chunk_stride": recipe.chunk_stride}],
        versions=versions(), built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        build_seconds=round(time.time() - t0, 3), build_key=key)
    atomic_write_json(partial / REPORT_FILE, {"corpora": [report.to_json()]})
    manifest = write_manifest(partial, manifest)
    publish(partial, out)
    log.info("built %s: %d passages in %.1fs", out, count, manifest.build_seconds)
    return manifest
