"""The remote path's overhead: `rag serve` with vLLM in-process against `rag serve` with backend
`openai` over a `vllm serve` of the same model, same questions, streaming; and `vllm serve`
alone on the final prompts as the baseline. Loopback only, one setup at a time.

    .venv/bin/python benchmarks/remote_generator.py [--concurrency 16] [--tokens 48]

Every request generates exactly ``--tokens`` tokens (``min_tokens`` = ``max_tokens``). The
remote setup runs two servers on the same cores (rag serve's retrieval and the vLLM server),
as a single-machine deployment of it would.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PYDOC_QUESTIONS as QUESTIONS  # noqa: E402
from _common import table  # noqa: E402
from serve_vs_vllm import final_prompts, free_port, level, pydoc_setup, start, stop  # noqa: E402

PIPELINE = """name: bench
retrieval: {{top_k: 3, context_chars: 1500}}
generator: {generator}
prompt: {{format: hf_template, context_position: user}}
generation: {{max_new_tokens: 48}}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    index, model, work = pydoc_setup("remote_generator")
    fixed = {"max_tokens": args.tokens, "min_tokens": args.tokens, "temperature": 0}
    c, n = args.concurrency, args.requests
    chat = [{"model": "bench", "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], **fixed}
            for i in range(n)]
    rag = str(Path(sys.executable).with_name("rag"))
    results: dict[str, dict[str, Any]] = {}

    def run(name: str, url: str, bodies: list[dict[str, Any]]) -> None:
        asyncio.run(level(url, bodies[:2], 2, True))  # warm-up
        results[name] = asyncio.run(level(url, bodies, c, True))
        print(f"{name}: {results[name]}", file=sys.stderr, flush=True)

    def rag_serve(name: str, generator: str) -> None:
        f = work / f"{name}.yaml"
        f.write_text(PIPELINE.format(generator=generator))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        proc = start([rag, "serve", "-p", str(f), "--index", str(index), "--port", str(port),
                      "--max-inflight", "256", "--timeout", "600"], base, work / f"{name}.log")
        try:
            run(f"rag serve ({name})", base + "/v1/chat/completions", chat)
        finally:
            stop(proc)

    # 1. rag serve, vLLM in the same process
    rag_serve("vllm in-process", "{backend: vllm, dtype: float32, max_model_len: 2048}")

    # 2. vllm serve alone (the final prompts), then rag serve over it (backend openai)
    port = free_port()
    vbase = f"http://127.0.0.1:{port}"
    vllm = start([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                  "--served-model-name", "m", "--dtype", "float32", "--max-model-len", "2048",
                  "--enforce-eager", "--host", "127.0.0.1", "--port", str(port)], vbase, work / "vllm.log")
    try:
        prompts = final_prompts(index, work, n)
        run("vllm serve", vbase + "/v1/completions", [{"model": "m", "prompt": p, **fixed} for p in prompts])
        rag_serve("openai -> vllm serve",
                  f"{{backend: openai, base_url: '{vbase}/v1', model: m, tokenizer: '{model}'}}")
    finally:
        stop(vllm)

    rows = [[name, r["n"], c, r["req/s"], r["tok/s"], r["ttft_p50"], r["lat_p50"], r["errors"]]
            for name, r in results.items()]
    print(table(rows, ["setup", "requests", "concurrency", "req/s", "output tok/s", "ttft p50 s",
                       "latency p50 s", "errors"]))
    local, remote = results["rag serve (vllm in-process)"], results["rag serve (openai -> vllm serve)"]
    print(f"remote / in-process: output tok/s {remote['tok/s'] / local['tok/s']:.2f}x, "
          f"first token p50 {remote['ttft_p50'] - local['ttft_p50']:+.3f}s, "
          f"latency p50 {remote['lat_p50'] / local['lat_p50']:.2f}x")


if __name__ == "__main__":
    main()
