"""Wrap an index a user already has (FlashRAG's ``e5_Flat.index`` + ``wiki18_100w.jsonl``, a DPR
``psgs_w100.tsv`` encoded elsewhere) into a `rag` index folder without re-encoding.

Row ``i`` of the FAISS index must be record ``i`` of the corpus (how FlashRAG and DPR write
them). The import checks the count, the dimension and the metric, that normalised indexes hold
unit vectors, and, when the encoder is available here, that re-encoding a sample of passages
reproduces their stored vectors (cosine >= ``min_cosine``).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from rag.corpus import ReadReport, corpus_fingerprint, detect_format, iter_records
from rag.embedding import Embedder, identity, load_embedder, passage_text, resolve_prompts
from rag.errors import ConfigError, ModelNotFoundError, RagError
from rag.index.checkpoints import batches
from rag.index.folder import (
    INDEX_FILE,
    REPORT_FILE,
    STORE_FILE,
    Manifest,
    atomic_write_json,
    finish,
    versions,
)
from rag.index.owner import writing
from rag.index.update import resolve_corpus
from rag.index.vectors import FaissIndex, import_faiss
from rag.store import PassageStore

log = logging.getLogger(__name__)


def describe(index: Any) -> str:
    """A factory string for a loaded FAISS index (what `rag index compact` and the manifest use)."""
    faiss = import_faiss()
    real = faiss.downcast_index(index)
    ivf = faiss.try_extract_index_ivf(index)
    if isinstance(real, faiss.IndexFlat):
        return "Flat"
    if isinstance(real, faiss.IndexHNSWFlat):
        return f"HNSW{real.hnsw.nb_neighbors(1)}"
    if ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFlat):
        return f"IVF{ivf.nlist},Flat"
    return f"imported:{type(real).__name__}"


def _as_encoded(fmt: str, title: str, text: str) -> str:
    """A passage as its toolkit encoded it: FlashRAG encodes ``contents`` (the title in quotes)."""
    return f'"{title}"\n{text}' if fmt == "flashrag" else passage_text(title, text)


def _sample_check(index: FaissIndex, store: PassageStore, embedder: Embedder, n: int, min_cosine: float,
                  normalize: bool, fmt: str) -> float:
    rows = sorted(np.random.default_rng(0).choice(index.ntotal, min(n, index.ntotal), replace=False).tolist())
    stored = index.vectors(rows)
    norms = np.linalg.norm(stored, axis=1)
    if normalize and index.metric == "ip" and np.abs(norms - 1).max() > 0.01:
        raise ConfigError(f"the stored vectors are not unit length (norms {norms.min():.3f}..{norms.max():.3f}); "
                          "import with --no-normalize")
    fresh = embedder.encode_passages([_as_encoded(fmt, p.title, p.text) for p in store.get_rows(rows)])
    cos = np.sum(stored * fresh, axis=1) / (norms * np.linalg.norm(fresh, axis=1))
    worst = float(cos.min())
    if worst < min_cosine:
        i = int(cos.argmin())
        raise ConfigError(f"re-encoding {len(rows)} sampled passages with {embedder.name} does not reproduce the "
                          f"stored vectors (row {rows[i]}: cosine {worst:.3f} < {min_cosine}); check --embedder, "
                          "--prompts (an e5 index needs e5) and --format, or pass --no-check")
    return worst


def import_index(index_file: str | Path, corpus: str | Path, out: str | Path, *, embedder: str,
                 format: str = "auto", prompts: str = "model", query_prompt: str = "", passage_prompt: str = "",
                 normalize: bool = True, metric: str | None = None, check: bool = True, sample: int = 64,
                 min_cosine: float = 0.98, embedder_obj: Embedder | None = None) -> Manifest:
    """Make ``out`` from an existing FAISS index file and its corpus (see the module docstring).

    Raises:
        ConfigError: count, dimension or metric disagree; the sample does not reproduce.
        IndexCorruptError: FAISS cannot read ``index_file``.
    """
    t0 = time.time()
    index_file, out, corpus = Path(index_file), Path(out), resolve_corpus(corpus)
    if not index_file.is_file():
        raise ConfigError(f"{index_file}: no such FAISS index file")
    index = FaissIndex.load(index_file, device="cpu")
    faiss = index.faiss
    found = {faiss.METRIC_INNER_PRODUCT: "ip", faiss.METRIC_L2: "l2"}.get(index.cpu_index.metric_type)
    if found is None or (metric is not None and metric != found):
        raise ConfigError(f"{index_file}: metric {found or index.cpu_index.metric_type} "
                          f"{'is not supported (ip or l2)' if found is None else f'but --metric {metric}'}")
    index.metric = found
    with writing(out, "import", create=True) as w:
        partial = w.work("import", fresh=True)
        report = ReadReport()
        with PassageStore(partial / STORE_FILE) as store:
            for batch in batches(iter_records(corpus, format, report=report), 10_000):
                store.add([r.passage for r in batch], sources=[r.source for r in batch],
                          locations=[f"{r.source}:{r.line}" if r.line else r.source for r in batch])
            count = len(store)
            if count != index.ntotal:
                raise ConfigError(f"{corpus} holds {count} passages ({report.empty_skipped} empty skipped) but "
                                  f"{index_file} holds {index.ntotal} vectors; give the corpus the index was built "
                                  "from, in the same order")
            query, passage = resolve_prompts(embedder, prompts, query_prompt, passage_prompt)
            emb = embedder_obj or load_embedder(embedder, normalize=normalize, query_prompt=query,
                                                passage_prompt=passage)
            worst: float | None = None
            try:
                ident = identity(emb)
            except (ModelNotFoundError, RagError, OSError) as e:
                if check:
                    raise ConfigError(f"cannot load the encoder {embedder} to check the import ({e}); "
                                      "give a local folder, or pass --no-check") from None
                ident = {"name": embedder, "dim": index.dim, "normalize": normalize, "query_prompt": query,
                         "passage_prompt": passage, "precision": "fp32"}
            if ident["dim"] != index.dim:
                raise ConfigError(f"{index_file} holds {index.dim}-dimensional vectors, "
                                  f"{embedder} makes {ident['dim']}")
            if check:
                fmt = detect_format(corpus) if format == "auto" else format
                worst = _sample_check(index, store, emb, sample, min_cosine, normalize, fmt)
        try:
            os.link(index_file, partial / INDEX_FILE)  # the same bytes; never written in place
        except OSError:
            shutil.copyfile(index_file, partial / INDEX_FILE)
        manifest = Manifest(
            name=out.name, embedder=ident, factory=describe(index.cpu_index), metric=found, passages=count,
            corpora=[{"path": str(corpus), "format": format, "fingerprint": corpus_fingerprint(corpus, format),
                      "passages": count}],
            versions=versions(), built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            build_seconds=round(time.time() - t0, 3),
            history=[{"op": "import", "index": str(index_file), "sampled": sample if check else 0,
                      "min_cosine": worst}])
        atomic_write_json(partial / REPORT_FILE, {"corpora": [report.to_json()]})
        return finish(w, partial, manifest, "import")

