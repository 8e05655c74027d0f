"""`rag serve --ray` against plain `rag serve`: the same chat requests (the default pipeline,
packaged SmolLM2 on transformers) at the same concurrency, requests/s and p50/p95 latency, with
1 and 2 Ray Serve replicas on a local Ray cluster; and fan-out search latency of a 2-shard folder
against the one index it was split from (same queries, one process).

    .venv/bin/python benchmarks/ray_serve.py [--requests 48] [--concurrency 8] [--max-tokens 16]

On one 2-core machine expect overhead, not speed-up: two replicas share the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PYDOC_QUESTIONS, ROOT, SHARED, table  # noqa: E402
from load import level  # noqa: E402

RAG = str(Path(sys.executable).with_name("rag"))


def served(args: list[str], requests: int, concurrency: int, max_tokens: int, log: Path) -> dict[str, float]:
    import httpx

    from tests.integration.servers import free_port

    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([RAG, "serve", "--port", str(port), *args], stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"rag serve {' '.join(args)} exited:\n{log.read_text()[-2000:]}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                raise SystemExit(f"rag serve {' '.join(args)} did not come up")
            time.sleep(1)
        asyncio.run(level(base, concurrency, concurrency, max_tokens))  # warm every replica
        return asyncio.run(level(base, requests, concurrency, max_tokens))
    finally:
        proc.terminate()
        proc.wait(120)


def fan_out(tmp: Path) -> list[list[object]]:
    """Median ms per query: one index vs its 2-shard split (dense and BM25), SciFact abstracts."""
    import json

    from rag.config import IndexRecipe
    from rag.index import build_index
    from rag.index.shards import shard_index
    from rag.retriever import open_retriever, query_embedder

    docs = (SHARED / "beir-scifact" / "corpus.jsonl").read_text().splitlines()[:1000]
    (tmp / "c.jsonl").write_text("\n".join(docs) + "\n")
    build_index(IndexRecipe(name="c", corpus=str(tmp / "c.jsonl"), format="beir", out=str(tmp / "idx")),
                progress=False)
    shard_index(tmp / "idx", tmp / "sh", 2)
    queries = [json.loads(x)["text"] for x in (SHARED / "beir-scifact" / "queries.jsonl").read_text().splitlines()]
    encoder = query_embedder(open_retriever(tmp / "idx", "dense"))
    rows = []
    for mode in ("dense", "bm25"):
        ms = []
        for folder in ("idx", "sh"):
            r = open_retriever(tmp / folder, mode, embedder=encoder)
            r.search(queries[0], 10)
            times = []
            for q in queries[:200]:
                t = time.perf_counter()
                r.search(q, 10)
                times.append(1000 * (time.perf_counter() - t))
            ms.append(sorted(times)[len(times) // 2])
            r.close()
        rows.append([mode, ms[0], ms[1], ms[1] / ms[0]])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--skip-serve", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_serve:
            runs = [("rag serve", []), ("rag serve --ray local, 1 replica", ["--ray", "local", "--replicas", "1"]),
                    ("rag serve --ray local, 2 replicas", ["--ray", "local", "--replicas", "2"])]
            for name, extra in runs:
                r = served(extra, args.requests, args.concurrency, args.max_tokens, Path(tmp) / "serve.log")
                rows.append([name, r["rps"], r["p50"], r["p95"], r["errors"] + r["r429"]])
            print(f"{args.requests} chat requests ({len(PYDOC_QUESTIONS)} questions), {args.concurrency} in flight, "
                  f"max_tokens {args.max_tokens}")
            print(table(rows, ["server", "requests/s", "p50 s", "p95 s", "failed"]))
            for row in rows[1:]:
                print(f"{row[0]}: {row[1] / rows[0][1]:.2f}x the requests/s of rag serve")
        print(table(fan_out(Path(tmp)), ["mode", "one index ms/query", "2 shards ms/query", "ratio"]))


if __name__ == "__main__":
    main()
