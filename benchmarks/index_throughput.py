"""Index build throughput and peak memory: `rag` vs raw encode+faiss.add vs LangChain FAISS.

    .venv/bin/python benchmarks/index_throughput.py [--docs 1000] [--synthetic 1000000]
        [--precisions bf16]

Each method runs in its own process (so peak RSS is its own), with the same encoder
(the packaged all-MiniLM-L6-v2, loaded before the clock starts) on the same SciFact passages.
Then `rag` builds synthetic corpora of 100k and N passages with a tiny hashing encoder to show
peak memory stays bounded as the corpus grows (only the FAISS index itself grows).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import minilm_path, peak_rss_mb, scifact, table, timed  # noqa: E402

warnings.filterwarnings("ignore")


def run_method(method: str, corpus: Path, n: int, workdir: Path) -> dict[str, float]:
    import numpy as np

    texts = None
    if method in ("raw", "langchain"):
        docs = [json.loads(x) for x in corpus.read_text().splitlines()]
        texts = [f"{d['title']}\n{d['text']}" for d in docs]
    ndcg = None
    if method.startswith("rag") or method == "synthetic":
        from rag.config import IndexRecipe
        from rag.embedding import load_embedder
        from rag.index import build_index

        precision = method.split("-", 1)[1] if "-" in method else "fp32"
        name = "hash:32" if method == "synthetic" else "all-MiniLM-L6-v2"
        emb = load_embedder(name, precision=precision)
        if method != "synthetic":
            emb.load()  # type: ignore[attr-defined]
        recipe = IndexRecipe(name="b", corpus=str(corpus), out=str(workdir / method), embedder=name,
                             batch_size=1024, precision=precision)  # type: ignore[arg-type]
        _, t = timed(lambda: build_index(recipe, embedder=emb, progress=False))
        if method != "synthetic":
            ndcg = scifact_ndcg(workdir / method)
    elif method == "raw":
        import faiss
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(minilm_path(), device="cpu")

        def build() -> None:
            vecs = model.encode(texts, batch_size=64, normalize_embeddings=True)
            index = faiss.IndexFlatIP(vecs.shape[1])
            index.add(np.asarray(vecs, dtype=np.float32))

        _, t = timed(build)
    else:
        from langchain_community.embeddings import HuggingFaceEmbeddings
        from langchain_community.vectorstores import FAISS

        lc_emb = HuggingFaceEmbeddings(model_name=minilm_path(), model_kwargs={"device": "cpu"},
                                       encode_kwargs={"normalize_embeddings": True, "batch_size": 64})
        _, t = timed(lambda: FAISS.from_texts(texts, lc_emb))
    return {"seconds": t, "passages": n, "peak_rss_mb": peak_rss_mb(), "ndcg10": ndcg}


def scifact_ndcg(folder: Path) -> float:
    """nDCG@10 over the SciFact test queries whose gold documents are in this index."""
    from _common import ndcg10

    from rag.retriever import DenseRetriever

    r = DenseRetriever.from_folder(folder)
    ids = {p.id for p in r.store.iter_passages()}
    _, queries, qrels = scifact()
    qids = [q for q in qrels if set(qrels[q]) & ids]
    hits = r.search_batch([queries[q] for q in qids], 10)
    return ndcg10({q: [h.passage.id for h in hs] for q, hs in zip(qids, hits)}, qrels)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--synthetic", type=int, default=1_000_000)
    ap.add_argument("--precisions", default="bf16", help="extra rag runs, e.g. bf16,fp16")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--method")
    ap.add_argument("--corpus")
    ap.add_argument("--n", type=int)
    ap.add_argument("--workdir")
    args = ap.parse_args()
    if args.method:
        print(json.dumps(run_method(args.method, Path(args.corpus), args.n, Path(args.workdir))))
        return

    def child(method: str, corpus: Path, n: int, workdir: str) -> dict[str, float]:
        out = subprocess.run([sys.executable, __file__, "--method", method, "--corpus", str(corpus),
                              "--n", str(n), "--workdir", workdir],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    docs = scifact()[0][: args.docs]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"id": d["_id"], "title": d["title"], "text": d["text"]})
                                  + "\n" for d in docs))
        methods = ["raw", "rag", "langchain"] + [f"rag-{p}" for p in args.precisions.split(",") if p]
        res = {m: child(m, corpus, len(docs), tmp) for m in methods}
        for m, r in res.items():
            ndcg = "" if r.get("ndcg10") is None else round(r["ndcg10"], 4)
            rows.append([m, r["passages"], round(r["seconds"], 2), round(r["passages"] / r["seconds"], 1),
                         round(r["peak_rss_mb"]), round(res["raw"]["seconds"] / r["seconds"], 3),
                         round(res["langchain"]["seconds"] / r["seconds"], 3), ndcg])
        print(f"SciFact passages, all-MiniLM-L6-v2 on CPU ({len(docs)} passages); raw and langchain fp32")
        print(table(rows, ["method", "passages", "seconds", "passages/s", "peak RSS MB", "speed vs raw",
                           "speed vs langchain", "nDCG@10 (subset)"]))
        print(f"rag / raw throughput ratio: {res['raw']['seconds'] / res['rag']['seconds']:.3f} (target >= 0.95)")
        print(f"rag / langchain throughput ratio: {res['langchain']['seconds'] / res['rag']['seconds']:.3f}")

        if args.skip_synthetic:
            return
        srows = []
        for n in sorted({100_000, args.synthetic}):
            syn = Path(tmp) / f"syn{n}.jsonl"
            with syn.open("w") as f:
                for i in range(n):
                    f.write(f'{{"id":"s{i}","text":"passage {i} word{i % 997} term{i % 101}"}}\n')
            r = child("synthetic", syn, n, tmp)
            srows.append([n, round(r["seconds"], 1), round(n / r["seconds"]), round(r["peak_rss_mb"]),
                          round(n * 32 * 4 / 2**20)])
        print("\nsynthetic corpus, hash:32 encoder, Flat index (memory bounded: only the index grows)")
        print(table(srows, ["passages", "seconds", "passages/s", "peak RSS MB", "index vectors MB"]))


if __name__ == "__main__":
    main()
