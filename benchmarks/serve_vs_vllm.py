"""`rag serve` (retrieval + vLLM) against `vllm serve` on the same model and the same final
prompts, streaming, at several concurrency levels; also `rag serve` on the transformers backend
and `rag serve` without streaming, and both servers with structured outputs (``response_format``
json_schema). Loopback only; one server at a time (they share the cores).

    .venv/bin/python benchmarks/serve_vs_vllm.py [--levels 1,16,64] [--tokens 48] [--skip-hf]
        [--hf-levels 1,16] [--skip-vllm] [--structured-level 16]

Every request generates exactly ``--tokens`` tokens (``min_tokens`` = ``max_tokens``, which both
servers accept), so tokens/s compare like for like. The prompts vLLM gets are the final prompts
`rag` builds for the same questions (pydoc index, top 3 passages in the user turn, SmolLM2's chat
template), sent to its ``/v1/completions``. Prints one table row per server and level and the
ratios the serving issue sets targets for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PYDOC_QUESTIONS as QUESTIONS  # noqa: E402
from _common import ROOT, table  # noqa: E402

PIPELINE = """name: bench
retrieval: {{top_k: 3, context_chars: 1500}}
generator: {{backend: {backend}, dtype: float32, max_model_len: 2048}}
prompt: {{format: hf_template, context_position: user}}
generation: {{max_new_tokens: 48}}
"""
REQUESTS = {1: 12, 16: 48, 64: 128}
#: The structured-output row: JSON requests constrained to this schema (vLLM's structured outputs
#: in both servers), without min_tokens (the grammar decides where the text ends).
SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
    "type": "object", "properties": {"answer": {"type": "string", "maxLength": 120},
                                     "module": {"type": "string", "maxLength": 40}},
    "required": ["answer", "module"]}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(cmd: list[str], base: str, log: Path) -> subprocess.Popen[bytes]:
    import httpx

    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit("server did not start")


def stop(proc: subprocess.Popen[bytes]) -> float:
    import signal

    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    return time.time() - t0


async def one(client: Any, url: str, body: dict[str, Any], stream: bool) -> tuple[float, float, int]:
    """(time to first text, total seconds, completion tokens) of one request."""
    t0 = time.perf_counter()
    first, tokens = None, 0
    if not stream:
        r = await client.post(url, json=body)
        r.raise_for_status()
        return float("nan"), time.perf_counter() - t0, int(r.json()["usage"]["completion_tokens"])
    async with client.stream("POST", url, json={**body, "stream": True,
                                                "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                raise RuntimeError(data["error"]["message"])
            for choice in data.get("choices") or []:
                text = choice.get("text") or (choice.get("delta") or {}).get("content")
                if text and first is None:
                    first = time.perf_counter() - t0
            if data.get("usage"):
                tokens = int(data["usage"]["completion_tokens"])
    return (first if first is not None else float("nan")), time.perf_counter() - t0, tokens


async def level(url: str, bodies: list[dict[str, Any]], concurrency: int, stream: bool) -> dict[str, Any]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    errors = 0

    async def guarded(body: dict[str, Any]) -> tuple[float, float, int] | None:
        nonlocal errors
        async with sem:
            try:
                return await one(client, url, body, stream)
            except Exception as e:  # counted, reported
                errors += 1
                print("error:", e, file=sys.stderr)
                return None

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 8)) as client:
        t0 = time.perf_counter()
        results = [r for r in await asyncio.gather(*(guarded(b) for b in bodies)) if r]
        wall = time.perf_counter() - t0
    ttft = sorted(r[0] for r in results)
    return {"req/s": len(results) / wall, "tok/s": sum(r[2] for r in results) / wall,
            "ttft_p50": ttft[len(ttft) // 2] if ttft else float("nan"),
            "lat_p50": sorted(r[1] for r in results)[len(results) // 2] if results else float("nan"),
            "errors": errors, "n": len(bodies)}


def final_prompts(index: Path, work: Path, n: int) -> list[str]:
    """The prompts `rag` sends for QUESTIONS (retrieval + chat template), built in-process."""
    from rag.config import load_pipeline_config
    from rag.pipeline import build_pipeline
    from rag.types import ChatMessage

    f = work / "bench-hf.yaml"
    f.write_text(PIPELINE.format(backend="hf"))
    pipe = build_pipeline(load_pipeline_config(f), index=index)
    prepared = asyncio.run(pipe.prepare([[ChatMessage(role="user", content=q)] for q in QUESTIONS]))
    return [prepared[i % len(QUESTIONS)].prompt for i in range(n)]


def pydoc_setup(name: str) -> tuple[Path, str, Path]:
    """The pydoc index (built once), the packaged SmolLM2's folder and runs/<name>/."""
    from rag.config import load_recipe
    from rag.index import build_index
    from rag.models import prepare_packaged_model

    recipe = load_recipe(ROOT / "indexes/pydoc.yaml")
    build_index(recipe, progress=False)
    work = ROOT / "runs" / name
    work.mkdir(parents=True, exist_ok=True)
    return ROOT / recipe.out_dir(), str(prepare_packaged_model()), work


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="1,16,64")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--hf-levels", default="1,16")
    ap.add_argument("--skip-vllm", action="store_true", help="only rag serve on transformers")
    ap.add_argument("--structured-level", type=int, default=16,
                    help="concurrency of the structured-output (json_schema) row, 0: none")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    index, model, work = pydoc_setup("serve_vs_vllm")
    most = max(REQUESTS.get(c, 2 * c) for c in levels)
    prompts = final_prompts(index, work, most)
    fixed = {"max_tokens": args.tokens, "min_tokens": args.tokens, "temperature": 0}
    rows, by = [], {}

    def record(server: str, mode: str, c: int, res: dict[str, Any]) -> None:
        by[(server, mode, c)] = res
        rows.append([server, mode, c, res["n"], res["req/s"], res["tok/s"], res["ttft_p50"],
                     res["lat_p50"], res["errors"]])
        print(f"{server} {mode} c={c}: {res}", file=sys.stderr, flush=True)

    # 1. vLLM's own server, the final prompts on /v1/completions
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--served-model-name", "m", "--dtype", "float32", "--max-model-len", "2048",
           "--enforce-eager", "--enable-prefix-caching", "--host", "127.0.0.1", "--port", str(port)]
    proc = None if args.skip_vllm else start(cmd, base, work / "vllm.log")
    try:
        for c in levels if proc else []:
            bodies = [{"model": "m", "prompt": p, **fixed} for p in prompts[: REQUESTS.get(c, 2 * c)]]
            asyncio.run(level(base + "/v1/completions", bodies[:2], 2, True))  # warm-up
            record("vllm serve", "stream", c, asyncio.run(level(base + "/v1/completions", bodies, c, True)))
            if c == args.structured_level:
                schema_bodies = [{"model": "m", "prompt": p, "max_tokens": args.tokens, "temperature": 0,
                                  "response_format": SCHEMA} for p in prompts[: REQUESTS.get(c, 2 * c)]]
                record("vllm serve", "json_schema", c, asyncio.run(level(base + "/v1/completions", schema_bodies,
                                                                         c, False)))
    finally:
        if proc:
            stop(proc)

    # 2. rag serve on vLLM (retrieval + prompt building + engine), streaming and not
    retrieval_ms = {}
    runs = [] if args.skip_vllm else [("vllm", levels)]
    if not args.skip_hf:
        runs.append(("hf", [int(x) for x in args.hf_levels.split(",")]))
    for backend, lv in runs:
        f = work / f"bench-{backend}.yaml"
        f.write_text(PIPELINE.format(backend=backend))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        rag = str(Path(sys.executable).with_name("rag"))
        proc = start([rag, "serve", "-p", str(f), "--index", str(index), "--port", str(port),
                      "--max-inflight", "256", "--timeout", "600"], base, work / f"rag-{backend}.log")
        name = f"rag serve ({backend})"
        try:
            for c in lv:
                bodies = [{"model": "bench", "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                           **fixed} for i in range(REQUESTS.get(c, 2 * c))]
                asyncio.run(level(base + "/v1/chat/completions", bodies[:2], 2, True))  # warm-up
                record(name, "stream", c, asyncio.run(level(base + "/v1/chat/completions", bodies, c, True)))
                if c == 16:
                    record(name, "json", c, asyncio.run(level(base + "/v1/chat/completions", bodies, c, False)))
                if c == args.structured_level and backend == "vllm":  # transformers refuses response_format
                    schema_bodies = [{**b, "min_tokens": 0, "response_format": SCHEMA} for b in bodies]
                    record(name, "json_schema", c, asyncio.run(level(base + "/v1/chat/completions", schema_bodies,
                                                                     c, False)))
            import httpx

            m = httpx.get(base + "/metrics").text
            total = float(re.search(r"^rag_retrieval_seconds_sum (\S+)", m, re.M).group(1))  # type: ignore[union-attr]
            count = float(re.search(r"^rag_retrieval_seconds_count (\S+)", m, re.M).group(1))  # type: ignore[union-attr]
            retrieval_ms[backend] = 1000 * total / max(count, 1)
            print(f"{name}: stopped {stop(proc):.1f}s after SIGTERM", file=sys.stderr)
        finally:
            if proc.poll() is None:
                proc.kill()

    print(table(rows, ["server", "mode", "concurrency", "requests", "req/s", "output tok/s", "ttft p50 s",
                       "latency p50 s", "errors"]))
    print(f"\nrag retrieval (server-side mean): {retrieval_ms}")
    for c in levels:
        v, r = by.get(("vllm serve", "stream", c)), by.get(("rag serve (vllm)", "stream", c))
        if v and r:
            budget = v["ttft_p50"] + retrieval_ms.get("vllm", 0) / 1000 + 0.05
            print(f"c={c}: output tok/s rag/vllm = {r['tok/s'] / v['tok/s']:.2f} (target >= 0.9); "
                  f"ttft p50 {r['ttft_p50']:.3f}s vs budget {budget:.3f}s "
                  f"(vllm {v['ttft_p50']:.3f}s + retrieval + 50 ms)")
        vs, rs = by.get(("vllm serve", "json_schema", c)), by.get(("rag serve (vllm)", "json_schema", c))
        if vs and rs:
            print(f"c={c} json_schema: req/s rag/vllm = {rs['req/s'] / vs['req/s']:.2f}, "
                  f"latency p50 {rs['lat_p50']:.2f}s vs {vs['lat_p50']:.2f}s")


if __name__ == "__main__":
    main()
