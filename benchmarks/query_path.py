"""Query path: 100 queries through `rag`'s batch API at each precision vs LangChain's retriever.

    .venv/bin/python benchmarks/query_path.py [--docs 1000] [--queries 100] [--precisions fp32,bf16,int8]

One fp32 index of SciFact passages (all-MiniLM-L6-v2); the same vectors go into a LangChain
FAISS store. For each precision, `rag` encodes the queries at that precision
(`DenseRetriever.from_folder(folder, precision=...)`) and searches: batch QPS through `search_batch`,
through `RagRetriever.batch` (the LangChain adapter), the median single-query latency, and
nDCG@10 on the SciFact queries whose gold passages are in the subset. The peer is LangChain's
`vectorstore.as_retriever().batch` (a thread pool, one encode per query) and `.invoke`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_ms, minilm_path, ndcg10, scifact, table, timed  # noqa: E402

warnings.filterwarnings("ignore")


def best_of(fn, repeats: int = 3) -> float:  # type: ignore[no-untyped-def]
    return min(timed(fn)[1] for _ in range(repeats))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--precisions", default="fp32,bf16,int8")
    args = ap.parse_args()
    import faiss
    from langchain_community.embeddings import HuggingFaceEmbeddings
    from langchain_community.vectorstores import FAISS

    from rag.config import IndexRecipe
    from rag.index import build_index
    from rag.integrations.langchain import RagRetriever
    from rag.retriever import DenseRetriever

    docs, queries, qrels = scifact()
    docs = docs[: args.docs]
    ids = {d["_id"] for d in docs}
    qids = [q for q in qrels if set(qrels[q]) & ids]
    # the benchmark queries: those with gold passages here first, then others, args.queries in all
    qids = (qids + [q for q in qrels if q not in set(qids)])[: args.queries]
    qs = [queries[q] for q in qids]

    def ndcg(ranked: list[list[str]]) -> float:
        return ndcg10({q: r for q, r in zip(qids, ranked) if set(qrels[q]) & ids}, qrels)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "c.jsonl"
        corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
        build_index(IndexRecipe(name="q", corpus=str(corpus), out=f"{tmp}/idx"), progress=False)
        vecs = faiss.read_index(f"{tmp}/idx/index.faiss").reconstruct_n(0, len(docs))

        lc_emb = HuggingFaceEmbeddings(model_name=minilm_path(), model_kwargs={"device": "cpu"},
                                       encode_kwargs={"normalize_embeddings": True})
        texts = [f"{d['title']}\n{d['text']}" for d in docs]
        lc = FAISS.from_embeddings(list(zip(texts, vecs.tolist())), lc_emb,
                                   metadatas=[{"id": d["_id"]} for d in docs])
        lc_ret = lc.as_retriever(search_kwargs={"k": 10})
        lc_ret.batch(qs[:4])
        t_lc = best_of(lambda: lc_ret.batch(qs))
        lc_docs = lc_ret.batch(qs)
        lc_ms = median_ms(lc_ret.invoke, qs)
        rows.append(["langchain retriever (fp32)", round(len(qs) / t_lc, 1), "", round(lc_ms, 2),
                     round(ndcg([[d.metadata["id"] for d in ds] for ds in lc_docs]), 4), 1.0])

        results = {}
        for p in args.precisions.split(","):
            ours = DenseRetriever.from_folder(f"{tmp}/idx", precision=p)
            adapter = RagRetriever(retriever=ours, top_k=10)
            ours.search_batch(qs[:4], 10)
            t_ours = best_of(lambda: ours.search_batch(qs, 10))  # noqa: B023
            t_adapter = best_of(lambda: adapter.batch(qs))  # noqa: B023
            ms = median_ms(lambda q: ours.search(q, 10), qs)  # noqa: B023
            hits = ours.search_batch(qs, 10)
            results[p] = t_ours
            rows.append([f"rag search_batch ({p})", round(len(qs) / t_ours, 1), round(len(qs) / t_adapter, 1),
                         round(ms, 2), round(ndcg([[h.passage.id for h in hs] for hs in hits]), 4),
                         round(t_lc / t_ours, 2)])
    print(f"{len(qs)} SciFact queries over {len(docs)} passages, top-10, all-MiniLM-L6-v2 on CPU; "
          f"best of 3 batch runs")
    print(table(rows, ["method", "batch QPS", "via LangChain adapter QPS", "single-query ms (median)",
                       "nDCG@10 (subset)", "batch speed vs langchain"]))
    for p, t in results.items():
        print(f"rag {p} batch / langchain retriever.batch: {t_lc / t:.2f}x (target >= 5x)")


if __name__ == "__main__":
    main()
