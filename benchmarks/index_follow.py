"""What following an index folder's changes costs a long-lived reader (``rag serve``): the
per-request check and the switch to a newly published version, at 100k passages.

1. The check every search makes (`rag.index.owner.changed`: one readlink of ``current``)
   against the search it guards (one query, k=10, exact FAISS over the folder's vectors).
2. The switch after ``rag index delete`` of one passage: `FollowingRetriever.refresh` (resolve
   the version, pin it, check sizes and the manifest's digest, open the store, read the FAISS
   index, let go of the old version), the first read of the new files; then opening the same
   version again (`open_retriever`, files in the page cache) against the raw library calls that
   open the same files (``faiss.read_index`` + ``sqlite3.connect``), run just before it. For
   bm25 the change built the new version's BM25 cache (its predecessor had one), so the switch
   loads it; against ``bm25s`` indexing the same texts, what the switch would cost otherwise.

The encoder is the hashing one (384-d): what is measured does not depend on it.

    .venv/bin/python benchmarks/index_follow.py [--passages 100000]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, timed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passages", type=int, default=100_000)
    ap.add_argument("--checks", type=int, default=200_000)
    args = ap.parse_args()
    import bm25s
    import faiss

    from rag.config import IndexRecipe
    from rag.embedding import HashingEmbedder, passage_text
    from rag.index import build_index, delete
    from rag.index.owner import changed
    from rag.retriever import FollowingRetriever, open_retriever

    work = Path(tempfile.mkdtemp(prefix="rag-follow-"))
    rng = np.random.default_rng(0)
    words = np.array([f"w{i}" for i in range(20_000)])
    with (work / "c.jsonl").open("w") as f:
        for i in range(args.passages):
            f.write(json.dumps({"id": f"p{i}", "title": f"doc {i}", "text": " ".join(rng.choice(words, 60))}) + "\n")
    emb = HashingEmbedder(384)
    recipe = IndexRecipe(name="f", corpus=str(work / "c.jsonl"), out=str(work / "idx"), embedder="hash:384",
                         batch_size=4096)
    _, t_build = timed(lambda: build_index(recipe, embedder=emb, progress=False))
    print(f"built {args.passages} passages in {t_build:.1f}s", file=sys.stderr, flush=True)
    idx = work / "idx"
    dense = FollowingRetriever(idx, "dense", embedder=emb, device="cpu")
    bm25 = FollowingRetriever(idx, "bm25")
    version = dense.version
    assert version is not None
    q = emb.encode_queries(["w1 w2 w3 w4 w5 w6"])

    t0 = time.perf_counter()
    for _ in range(args.checks):
        changed(idx, version)
    check_us = (time.perf_counter() - t0) / args.checks * 1e6
    index = dense.current.index  # type: ignore[attr-defined]
    times = []
    for _ in range(50):
        t = time.perf_counter()
        index.search(q, 10)
        times.append(time.perf_counter() - t)
    search_us = sorted(times)[len(times) // 2] * 1e6

    _, t_delete = timed(lambda: delete(idx, ["p0"]))
    _, t_switch = timed(dense.refresh)
    _, t_switch_bm25 = timed(bm25.refresh)
    assert dense.version is not None and dense.version.number == version.number + 1

    def raw_open() -> None:
        faiss.read_index(str(idx / "current" / "index.faiss"))
        sqlite3.connect(f"file:{idx / 'current' / 'passages.db'}?mode=ro", uri=True).execute(
            "SELECT COUNT(*) FROM passages").fetchone()

    _, t_raw = timed(raw_open)  # the files are in the page cache now: so for ours, open them again
    _, t_open = timed(lambda: open_retriever(idx, "dense", embedder=emb, device="cpu").close())
    texts = [passage_text(p.title, p.text) for p in dense.store.iter_passages()]

    def raw_bm25() -> None:
        bm25s.BM25().index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)

    _, t_raw_bm25 = timed(raw_bm25)
    print(table([
        ["check per search (readlink of current)", f"{check_us:.2f} us", f"{search_us:.0f} us (one FAISS search)",
         f"{check_us / search_us:.4f}"],
        ["switch, dense (FollowingRetriever.refresh, first read of the new files)", f"{t_switch:.3f} s", "", ""],
        ["open a version, dense (files cached)", f"{t_open:.3f} s", f"{t_raw:.3f} s (read_index + sqlite)",
         f"{t_open / t_raw:.2f}"],
        ["switch, bm25 (loads the cache the change built)", f"{t_switch_bm25:.3f} s",
         f"{t_raw_bm25:.3f} s (bm25s indexing the texts)", f"{t_switch_bm25 / t_raw_bm25:.3f}"],
        ["the change: rag index delete of 1 passage (verify, copy, new BM25 cache)", f"{t_delete:.3f} s", "", ""],
    ], ["at " + f"{args.passages:,} passages", "rag", "baseline", "ratio"]))
    dense.close()
    bm25.close()


if __name__ == "__main__":
    main()
