"""BEIR SciFact (test qrels): nDCG@10 and recall@100 through `rag` vs raw libraries, one run.

    .venv/bin/python benchmarks/retrieval_quality.py [--limit-docs N]

Raw baselines: sentence-transformers encode + faiss IndexFlatIP; bm25s with English stopwords.
`rag` must reproduce them within 0.005; hybrid (RRF) should beat both.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import minilm_path, scifact, table, timed  # noqa: E402

from rag.config import IndexRecipe  # noqa: E402
from rag.eval.retrieval import mean, per_query  # noqa: E402
from rag.index import build_index  # noqa: E402
from rag.retriever import BM25Retriever, DenseRetriever, HybridRetriever  # noqa: E402


def score(ranked: dict[str, list[tuple[str, float]]], qrels: dict[str, dict[str, int]]) -> tuple[float, float]:
    """nDCG@10 and recall@100 (trec_eval through ir-measures, the measures rag eval reports)
    of rankings with their own scores, as BEIR evaluates them."""
    per = per_query(qrels, ranked, ["ndcg@10", "recall@100"])
    return mean(per, "ndcg@10"), mean(per, "recall@100")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit-docs", type=int, default=None, help="smoke runs only")
    args = ap.parse_args()
    docs, queries, qrels = scifact()
    if args.limit_docs:
        docs = docs[: args.limit_docs]
        ids = {d["_id"] for d in docs}
        qrels = {q: r for q, r in qrels.items() if set(r) & ids}
    qids = sorted(qrels)
    qtexts = [queries[q] for q in qids]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
        recipe = IndexRecipe(name="scifact", corpus=str(corpus), format="beir", out=f"{tmp}/idx")
        _, t_build = timed(lambda: build_index(recipe, progress=False))
        dense = DenseRetriever.from_folder(f"{tmp}/idx")
        bm25 = BM25Retriever(f"{tmp}/idx")
        hybrid = HybridRetriever(dense, bm25)
        for name, r in [("rag dense", dense), ("rag bm25", bm25), ("rag hybrid", hybrid)]:
            hits, t = timed(lambda r=r: r.search_batch(qtexts, 100))
            ranked = {q: [(h.passage.id, h.score) for h in hs] for q, hs in zip(qids, hits)}
            rows.append([name, *score(ranked, qrels), round(t, 2)])

    # raw sentence-transformers + faiss
    import faiss
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(minilm_path(), device="cpu")
    texts = [(d.get("title", "") + " " + d["text"]).strip() for d in docs]
    emb, t_raw = timed(lambda: model.encode(texts, batch_size=64, normalize_embeddings=True))
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(np.asarray(emb, dtype=np.float32))
    qv = model.encode(qtexts, normalize_embeddings=True)
    dd, ii = index.search(np.asarray(qv, dtype=np.float32), 100)
    ranked = {q: [(docs[i]["_id"], float(s)) for i, s in zip(row, srow)] for q, row, srow in zip(qids, ii, dd)}
    rows.append(["raw st+faiss", *score(ranked, qrels), round(t_raw, 2)])

    import bm25s

    bm = bm25s.BM25()
    bm.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    res, sc = bm.retrieve(bm25s.tokenize(qtexts, stopwords="en", show_progress=False),
                          k=100, show_progress=False)
    ranked = {q: [(docs[i]["_id"], float(s)) for i, s in zip(row, srow)] for q, row, srow in zip(qids, res, sc)}
    rows.append(["raw bm25s", *score(ranked, qrels), 0.0])

    print(f"SciFact: {len(docs)} docs, {len(qids)} test queries; rag index build {t_build:.1f}s, "
          f"raw encode {t_raw:.1f}s")
    print(table(rows, ["system", "nDCG@10", "recall@100", "search s"]))
    by = {r[0]: r for r in rows}
    for ours, raw in [("rag dense", "raw st+faiss"), ("rag bm25", "raw bm25s")]:
        d = by[ours][1] - by[raw][1]
        print(f"{ours} - {raw}: nDCG@10 {d:+.4f} ({'OK' if abs(d) <= 0.005 else 'OFF'} within 0.005)")
    best_single = max(by["rag dense"][1], by["rag bm25"][1])
    print(f"hybrid vs best single: {by['rag hybrid'][1] - best_single:+.4f} nDCG@10")


if __name__ == "__main__":
    main()
