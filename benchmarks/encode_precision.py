"""Encoding throughput of the packaged MiniLM through `rag` at each precision, on the
1,000 DPR-format 100-word Wikipedia passages, with cosine agreement to fp32.

    .venv/bin/python benchmarks/encode_precision.py [--precisions fp32,bf16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, table  # noqa: E402


def main() -> None:
    from rag.corpus import read_corpus
    from rag.embedding import SentenceTransformerEmbedder, passage_text

    ap = argparse.ArgumentParser()
    ap.add_argument("--precisions", default="fp32,bf16")
    args = ap.parse_args()
    texts = [passage_text(p.title, p.text) for p in
             read_corpus(SHARED / "dpr-wiki-sample/psgs_w100.flashrag_sample1000.tsv")]
    rows, ref, base = [], None, None
    for precision in args.precisions.split(","):
        emb = SentenceTransformerEmbedder(precision=precision, device="cpu").load()
        emb.encode_passages(texts[:64])
        t = time.perf_counter()
        vecs = emb.encode_passages(texts)
        secs = time.perf_counter() - t
        if ref is None:
            ref, base = vecs, secs
        cos = float(((vecs * ref).sum(1)).min())
        rows.append([precision, round(len(texts) / secs, 1), round(base / secs, 2), round(cos, 5)])
    print(f"{len(texts)} DPR passages (100 words), all-MiniLM-L6-v2 via rag, CPU (2 cores)")
    print(table(rows, ["precision", "passages/s", "speed vs fp32", "min cosine to fp32"]))


if __name__ == "__main__":
    main()
