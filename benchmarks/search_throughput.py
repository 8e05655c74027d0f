"""Search throughput: `rag` DenseRetriever vs raw encode+faiss.search vs LangChain FAISS.

    .venv/bin/python benchmarks/search_throughput.py [--docs 1000]

Same encoder, same vectors (all built from the same SciFact passages), 300 SciFact queries,
top-10. `rag` also fetches the passages from its store; raw faiss returns only ids.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median_ms, minilm_path, scifact, table, timed  # noqa: E402

warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=1000)
    args = ap.parse_args()
    import faiss
    from langchain_community.embeddings import HuggingFaceEmbeddings
    from langchain_community.vectorstores import FAISS

    from rag.config import IndexRecipe
    from rag.index import build_index
    from rag.retriever import DenseRetriever

    docs, queries, _ = scifact()
    docs = docs[: args.docs]
    qs = list(queries.values())
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "c.jsonl"
        corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
        build_index(IndexRecipe(name="s", corpus=str(corpus), out=f"{tmp}/idx"), progress=False)
        ours = DenseRetriever.from_folder(f"{tmp}/idx")
        model = ours.embedder.model  # type: ignore[attr-defined]
        vecs = faiss.read_index(f"{tmp}/idx/index.faiss").reconstruct_n(0, len(docs))
        raw = faiss.IndexFlatIP(vecs.shape[1])
        raw.add(vecs)
        lc_emb = HuggingFaceEmbeddings(model_name=minilm_path(), model_kwargs={"device": "cpu"},
                                       encode_kwargs={"normalize_embeddings": True})
        texts = [f"{d['title']}\n{d['text']}" for d in docs]
        lc = FAISS.from_embeddings(list(zip(texts, vecs.tolist())), lc_emb)

        def raw_batch(batch: list[str]) -> None:
            raw.search(np.asarray(model.encode(batch, normalize_embeddings=True), np.float32), 10)

        ours.search_batch(qs[:8], 10)  # warm-up
        raw_batch(qs[:8])
        _, t_ours = timed(lambda: ours.search_batch(qs, 10))
        _, t_raw = timed(lambda: raw_batch(qs))
        _, t_lc = timed(lambda: [lc.similarity_search(q, k=10) for q in qs])
        _, t_lc_batch = timed(lambda: lc.as_retriever(search_kwargs={"k": 10}).batch(qs))
        rows = [
            ["rag search_batch", round(len(qs) / t_ours, 1), round(median_ms(lambda q: ours.search(q, 10), qs), 2)],
            ["raw encode+faiss", round(len(qs) / t_raw, 1), round(median_ms(lambda q: raw_batch([q]), qs), 2)],
            ["langchain similarity_search loop", round(len(qs) / t_lc, 1),
             round(median_ms(lambda q: lc.similarity_search(q, k=10), qs), 2)],
            ["langchain retriever.batch", round(len(qs) / t_lc_batch, 1), ""],
        ]
        q1 = np.asarray(model.encode(qs[:1], normalize_embeddings=True), np.float32)
        search_only = median_ms(lambda q: raw.search(q1, 10), qs)
    print(f"{len(qs)} SciFact queries over {len(docs)} passages, top-10, all-MiniLM-L6-v2 fp32 CPU")
    print(table(rows, ["method", "batch QPS", "single-query ms (median)"]))
    print(f"rag / raw batch QPS ratio: {t_raw / t_ours:.3f} (target >= 0.9)")
    print(f"rag / langchain loop QPS ratio: {t_lc / t_ours:.2f}; vs langchain batch {t_lc_batch / t_ours:.2f}")
    print(f"faiss search alone: {search_only:.3f} ms per query (encoding dominates)")


if __name__ == "__main__":
    main()
