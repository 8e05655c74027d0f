"""Bytes per passage of each FAISS index type and of the passage store (for docs/scaling.md).

    .venv/bin/python benchmarks/index_sizes.py [--n 20000] [--store indexes/squad-dev]

Index bytes come from writing real indexes of N random 384-d vectors; the store's from an
existing index folder's passages.db divided by its passage count.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table  # noqa: E402


def main() -> None:
    import faiss

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--store", default="indexes/squad-dev")
    args = ap.parse_args()
    x = np.random.default_rng(0).standard_normal((args.n, args.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for factory in ("Flat", "HNSW32", "IVF256,SQ8", "IVF256,PQ64", "IVF256,PQ32"):
            index = faiss.index_factory(args.dim, factory, faiss.METRIC_INNER_PRODUCT)
            t0 = time.perf_counter()
            if not index.is_trained:
                index.train(x)
            index.add(x)
            secs = time.perf_counter() - t0
            path = os.path.join(tmp, "i.faiss")
            faiss.write_index(index, path)
            size = os.path.getsize(path)
            rows.append([factory, round(size / args.n, 1), round(secs / args.n * 1e6, 1)])
    print(f"{args.n} random {args.dim}-d vectors")
    print(table(rows, ["factory", "bytes/vector (file)", "build µs/vector (2 cores)"]))
    store = Path(args.store) / "passages.db"
    if store.exists():
        from rag.store import PassageStore

        n = len(PassageStore(store, readonly=True))
        chars = sum(len(p.text) + len(p.title) for p in PassageStore(store, readonly=True).iter_passages())
        print(f"store {store}: {store.stat().st_size / n:.0f} bytes/passage for {chars / n:.0f} "
              f"characters/passage ({n} passages)")


if __name__ == "__main__":
    main()
