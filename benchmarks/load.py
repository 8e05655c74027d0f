"""Bounded load on the served default pipeline (loopback only), and the same requests through
the Python API as the baseline.

    .venv/bin/python benchmarks/load.py [--requests 48] [--levels 1,8,32] [--max-tokens 24]

Starts `rag serve` as a subprocess on 127.0.0.1 (a free port), sends each level's requests with
that many in flight (httpx, asyncio), and reports throughput, p50/p95/p99 latency, errors (5xx
and other failures) and 429s separately. Baseline: the same questions through
`pipeline.answer_batch` in batches of the concurrency level, in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PYDOC_QUESTIONS as QUESTIONS  # noqa: E402
from _common import ROOT, table  # noqa: E402


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def level(base: str, n: int, concurrency: int, max_tokens: int) -> dict[str, float]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    lat, codes = [], []

    async def one(i: int, client: httpx.AsyncClient) -> None:
        async with sem:
            t = time.perf_counter()
            try:
                r = await client.post(base + "/v1/chat/completions", json={
                    "model": "default", "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]})
                codes.append(r.status_code)
            except httpx.HTTPError:
                codes.append(-1)
            lat.append(time.perf_counter() - t)

    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, client) for i in range(n)))
        wall = time.perf_counter() - t0
    ok = codes.count(200)
    return {"wall": wall, "rps": ok / wall, "p50": pct(lat, 0.5), "p95": pct(lat, 0.95),
            "p99": pct(lat, 0.99), "errors": sum(1 for c in codes if c not in (200, 429)),
            "r429": codes.count(429), "ok": ok}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--pipeline", default=str(ROOT / "rag/pipelines/default.yaml"))
    ap.add_argument("--index", default=str(ROOT / "indexes/pydoc"))
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rag = str(Path(sys.executable).with_name("rag"))
    server = subprocess.Popen([rag, "serve", "--pipeline", args.pipeline, "--index", args.index,
                               "--port", str(port), "--max-inflight", "64"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    base = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise SystemExit("server did not start")
            time.sleep(0.5)
        asyncio.run(level(base, 2, 1, args.max_tokens))  # warm-up
        served = {c: asyncio.run(level(base, args.requests, c, args.max_tokens)) for c in levels}
    finally:
        server.terminate()
        server.wait(30)

    from rag.config import load_pipeline_config
    from rag.pipeline import build_pipeline
    from rag.types import ChatMessage

    pipe = build_pipeline(load_pipeline_config(args.pipeline), index=args.index).load()
    params = pipe.config.generation.model_copy(update={"max_new_tokens": args.max_tokens})
    pipe.answer_batch([[ChatMessage(role="user", content=QUESTIONS[0])]], params=params)  # warm-up
    rows = []
    for c in levels:
        convos = [[ChatMessage(role="user", content=QUESTIONS[i % len(QUESTIONS)])]
                  for i in range(args.requests)]
        t0 = time.perf_counter()
        for i in range(0, len(convos), c):
            pipe.answer_batch(convos[i: i + c], params=params)
        api_rps = args.requests / (time.perf_counter() - t0)
        s = served[c]
        rows.append([c, s["ok"], round(s["rps"], 2), round(s["p50"], 2), round(s["p95"], 2),
                     round(s["p99"], 2), s["errors"], s["r429"], round(api_rps, 2),
                     round(s["rps"] / api_rps, 3)])
    print(f"{args.requests} requests per level, {args.max_tokens} max tokens, "
          f"{Path(args.pipeline).name} over {Path(args.index).name}, loopback")
    print(table(rows, ["concurrency", "200s", "req/s", "p50 s", "p95 s", "p99 s", "errors", "429s",
                       "API req/s", "served/API"]))


if __name__ == "__main__":
    main()
