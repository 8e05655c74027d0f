"""Changing an index against rebuilding it: delete 1%, upsert 1%, and search after 30% deletes.

    .venv/bin/python benchmarks/index_update.py [--passages 100000] [--factory Flat]

One corpus of N synthetic passages (words drawn from the DPR Wikipedia sample, 60 per passage),
the packaged all-MiniLM-L6-v2 (loaded before any clock starts):

1. full build of the corpus (the rebuild every change would cost without deletes/upserts);
2. `rag index delete` of 1% of the ids, and `rag index upsert` of 1% (half changed texts, half
   new passages): each as a fraction of the build (target <= 5%);
3. LangChain's FAISS store (the peer) over the same vectors: its `delete` of the same 1%, and its
   upsert (delete + add_texts);
4. search QPS (batches of 256 queries, k=10) after deleting 30%: FAISS skipping the deleted rows
   by selector, then after `rag index compact`, against raw FAISS over the same live vectors.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import SHARED, table, timed  # noqa: E402


def corpus(path: Path, n: int, seed: int = 0, start: int = 0, variant: int = 0) -> list[dict[str, Any]]:
    words = (SHARED / "dpr-wiki-sample/psgs_w100.flashrag_sample1000.tsv").read_text(encoding="utf-8").split()
    vocab = np.array(sorted({w for w in words if w.isalpha()}))
    rng = np.random.default_rng(seed + 7919 * variant)
    recs = [{"id": f"s{i}", "title": f"doc {i}", "text": " ".join(rng.choice(vocab, 60))}
            for i in range(start, start + n)]
    with path.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    return recs


def qps(search: Any, queries: np.ndarray, rounds: int = 3) -> float:
    search(queries[:256])
    t = time.perf_counter()
    for _ in range(rounds):
        for i in range(0, len(queries), 256):
            search(queries[i: i + 256])
    return rounds * len(queries) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passages", type=int, default=100_000)
    ap.add_argument("--factory", default="Flat")
    args = ap.parse_args()
    import faiss

    from rag.config import IndexRecipe
    from rag.embedding import load_embedder
    from rag.index import build_index, compact, delete, upsert
    from rag.retriever import DenseRetriever

    n, one = args.passages, args.passages // 100
    emb = load_embedder("all-MiniLM-L6-v2")
    emb.load()  # type: ignore[attr-defined]
    work = Path(tempfile.mkdtemp(prefix="rag-update-"))
    recs = corpus(work / "c.jsonl", n)
    recipe = IndexRecipe(name="u", corpus=str(work / "c.jsonl"), out=str(work / "idx"), embedder="all-MiniLM-L6-v2",
                         factory=args.factory, batch_size=512)
    _, t_build = timed(lambda: build_index(recipe, embedder=emb, progress=False))
    print(f"build {n}: {t_build:.1f}s", file=sys.stderr, flush=True)
    rng = np.random.default_rng(1)
    gone = [recs[i]["id"] for i in rng.choice(n, one, replace=False)]
    _, t_del = timed(lambda: delete(work / "idx", gone))
    changed = [dict(r, text=r["text"] + " revised") for r in (recs[i] for i in rng.choice(n, one // 2, replace=False))]
    new = corpus(work / "new.jsonl", one - len(changed), seed=5, start=n)
    (work / "up.jsonl").write_text("".join(json.dumps(r) + "\n" for r in changed + new))
    _, t_up = timed(lambda: upsert(work / "idx", work / "up.jsonl", embedder=emb, progress=False))
    rows: list[list[Any]] = [["full build", round(t_build, 1), "1.000"],
                             ["rag index delete 1%", round(t_del, 3), f"{t_del / t_build:.3f}"],
                             ["rag index upsert 1% (re-encodes 1%)", round(t_up, 3), f"{t_up / t_build:.3f}"]]
    dense = DenseRetriever.from_folder(work / "idx", embedder=emb, device="cpu")
    try:  # the peer: LangChain's FAISS store over the same vectors
        from langchain_community.docstore.in_memory import InMemoryDocstore
        from langchain_community.vectorstores import FAISS as LCFAISS  # noqa: N811
        from langchain_core.documents import Document
        from langchain_core.embeddings import Embeddings

        class Enc(Embeddings):
            def embed_documents(self, texts: list[str]) -> list[list[float]]:
                return emb.encode_passages(texts).tolist()

            def embed_query(self, text: str) -> list[float]:
                return emb.encode_queries([text])[0].tolist()

        rows_live = dense.store.live_rows()
        lc_index = faiss.IndexFlatIP(dense.index.dim)
        lc_index.add(dense.index.vectors(rows_live))
        ids = [p.id for p in dense.store.get_rows(rows_live)]
        lc = LCFAISS(Enc(), lc_index, InMemoryDocstore({i: Document(page_content=i) for i in ids}),
                     dict(enumerate(ids)))
        lc_gone = [ids[i] for i in rng.choice(len(ids), one, replace=False)]
        _, t_lc_del = timed(lambda: lc.delete(lc_gone))
        lc_changed = [i for i in ids if i not in set(lc_gone)][: one // 2]
        by_id = {r["id"]: r for r in recs}
        texts = [f"{by_id[i]['title']}\n{by_id[i]['text']} revised" for i in lc_changed] + \
            [f"{r['title']}\n{r['text']}" for r in new]

        def lc_upsert() -> None:
            lc.delete(lc_changed)
            lc.add_texts(texts, ids=lc_changed + [f"n{r['id']}" for r in new])

        _, t_lc_up = timed(lc_upsert)
        rows += [["LangChain FAISS delete 1%", round(t_lc_del, 4), f"{t_lc_del / t_build:.3f}"],
                 ["LangChain FAISS upsert 1% (delete + add_texts)", round(t_lc_up, 3), f"{t_lc_up / t_build:.3f}"]]
    except ImportError as e:
        print(f"LangChain FAISS not measured: {e}", file=sys.stderr)
    # search after 30% deletes
    live = dense.store.live_rows()
    ids = [p.id for p in dense.store.get_rows(live)]
    delete(work / "idx", [ids[i] for i in rng.choice(len(ids), int(0.3 * len(ids)), replace=False)])
    queries = emb.encode_queries([f"{r['text'][:80]}" for r in recs[:2048]])
    before = DenseRetriever.from_folder(work / "idx", embedder=emb, device="cpu")
    q_del = qps(lambda q: before.index.search(q, 10, exclude=before.deleted), queries)
    size_before = sum(f.stat().st_size for f in (work / "idx").iterdir() if f.is_file())
    _, t_compact = timed(lambda: compact(work / "idx"))
    after = DenseRetriever.from_folder(work / "idx", embedder=emb, device="cpu")
    q_compact = qps(lambda q: after.index.search(q, 10), queries)
    raw = faiss.read_index(str(work / "idx" / "index.faiss"))
    q_raw = qps(lambda q: raw.search(q, 10), queries)
    size_after = sum(f.stat().st_size for f in (work / "idx").iterdir() if f.is_file())
    print(f"{n} synthetic passages, {args.factory}, all-MiniLM-L6-v2 on CPU")
    print(table(rows, ["change", "seconds", "/ full build"]))
    print(table([["30% deleted, skipped by selector", round(q_del)],
                 [f"after rag index compact ({t_compact:.1f}s, {size_before >> 20} -> {size_after >> 20} MiB)",
                  round(q_compact)],
                 ["raw FAISS over the compacted index", round(q_raw)]], ["search (k=10, batches of 256)", "QPS"]))
    print(f"deleted-rows / compacted QPS: {q_del / q_compact:.2f}x; compacted / raw FAISS: {q_compact / q_raw:.2f}x")


if __name__ == "__main__":
    main()
