"""``rag tune query``: choose how conversations are searched (``retrieval.query``) and reranked
(``retrieval.rerank``) on the user's own conversational turns, and check the choice on turns it
never saw.

The turns with gold passages are split by a seeded hash of their ids (`rag.eval.fusion.split`).
The strategies are planned as the pipeline plans them (`rag.pipeline.queries.query_plan`), and
every text a plan searches is searched once, ``depth`` deep, with the pipeline's retriever. The
grid is ``last_turn``, ``history`` at every (``history_messages``, ``history_weight``) and, with
``llm``, ``rewrite`` and ``hyde`` at every ``hyde_weight`` (the generator writes each turn's
rewrite and passage once). When the pipeline has a reranker, it scores the best strategy's top
``max(CANDIDATES)`` once per turn, and (``candidates``, ``weight``) is chosen among those and no
reranking. Ties go to ``last_turn``, the lighter weight, and no reranking. The choice is reported
on the held-out half next to ``last_turn``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from rag.eval.datasets import EvalItem
from rag.eval.fusion import _score, halves
from rag.pipeline import BasePipeline
from rag.pipeline.queries import QueryPlan, plan_texts, planned_hits, query_plan
from rag.rerank import rerank_hits
from rag.types import Hit

WEIGHTS = (0.1, 0.2, 0.3, 0.4, 0.5)
MESSAGES = (1, 2, 0)
HYDE_WEIGHTS = (0.2, 0.35, 0.5, 0.65)
CANDIDATES = (10, 20, 50)
RERANK_WEIGHTS = (0.25, 0.5, 0.75, 1.0)


def strategy_grid(llm: bool) -> list[dict[str, Any]]:
    grid: list[dict[str, Any]] = [{"query": "last_turn"}] + [
        {"query": "history", "history_messages": n, "history_weight": w} for n in MESSAGES for w in WEIGHTS]
    if llm:
        grid += [{"query": "rewrite"}] + [{"query": "hyde", "hyde_weight": w} for w in HYDE_WEIGHTS]
    return grid


async def _written(pipeline: BasePipeline, turns: Sequence[EvalItem], batch: int = 32) -> dict[tuple[str, str], str]:
    """Each turn's rewrite and HyDE passage by the pipeline's generator."""
    out: dict[tuple[str, str], str] = {}
    for strategy in ("rewrite", "hyde"):
        for i in range(0, len(turns), batch):
            chunk = turns[i: i + batch]
            texts = await asyncio.gather(*(pipeline.rewrite(it.messages or [], passage=strategy == "hyde")
                                           for it in chunk))
            out.update({(strategy, it.id): t for it, t in zip(chunk, texts, strict=True)})
    return out


def _key(score: float, g: dict[str, Any]) -> tuple[float, bool, float, bool]:
    weight = g.get("history_weight", g.get("hyde_weight", 0.0))
    return round(score, 10), g["query"] == "last_turn", -weight, g.get("rerank") is None


def tune_query(items: Sequence[EvalItem], pipeline: BasePipeline, *, measure: str = "ndcg@10",
               held_out: float = 0.5, seed: int = 0, depth: int = 100, llm: bool = False) -> dict[str, Any]:
    """The grid's best strategy (and reranking) on the tuning half, and the held-out table."""
    turns = [it for it in items if it.gold_ids and it.messages]
    tune_items, held = halves(turns, held_out, seed, "conversational turns with gold passages (give a "
                              "conversational folder: conversations.jsonl + qrels.tsv)")
    base = pipeline.config.retrieval
    written = asyncio.run(_written(pipeline, turns)) if llm else {}
    grid = strategy_grid(llm)
    plans = [{it.id: query_plan(base.model_copy(update=g), it.messages or [], written.get((g["query"], it.id)))
              for it in turns} for g in grid]
    texts = plan_texts([p for by_turn in plans for p in by_turn.values()])
    found = dict(zip(texts, pipeline.search_batch(texts, depth), strict=True))
    hits = [dict(zip(by_turn, planned_hits(list(by_turn.values()), found, depth), strict=True)) for by_turn in plans]

    def score(group: Sequence[EvalItem], ranked: dict[str, list[Hit]]) -> float:
        # scored by position: a reranked head followed by the first stage's tail mixes score scales
        return _score(group, {it.id: [(h.passage.id, -float(n)) for n, h in enumerate(ranked[it.id])]
                              for it in group}, measure)

    scored = [(score(tune_items, h), g, h, p) for g, h, p in zip(grid, hits, plans, strict=True)]
    best_score, best, best_hits, best_plans = max(scored, key=lambda s: _key(s[0], s[1]))
    table = {"last_turn": score(held, hits[0]), "tuned": score(held, best_hits)}
    result: dict[str, Any] = {"measure": measure, "query": best, "tune_score": best_score,
                              "tune_queries": len(tune_items), "held_out_queries": len(held), "held_out": table,
                              "grid": [{**g, "score": s} for s, g, _, _ in scored]}
    if base.rerank is not None:
        _tune_rerank(result, pipeline, best_plans, best_hits, score, tune_items, held)
    return result


def _tune_rerank(result: dict[str, Any], pipeline: BasePipeline, plans: dict[str, QueryPlan],
                 first_stage: dict[str, list[Hit]], score: Any, tune_items: Sequence[EvalItem],
                 held: Sequence[EvalItem]) -> None:
    """Choose (``candidates``, ``weight``) of the pipeline's reranker over the chosen strategy's
    first stage, or no reranking; record it in ``result``."""
    reranker = pipeline.reranker
    assert reranker is not None
    top = max(CANDIDATES)
    scores = {tid: reranker.score(plans[tid].rerank_by, [h.passage for h in hs[:top]])
              for tid, hs in first_stage.items()}
    k = max(len(hs) for hs in first_stage.values())

    def reranked(c: int, w: float) -> dict[str, list[Hit]]:
        return {tid: rerank_hits(hs[:c], scores[tid][:c], c, weight=w) + hs[c:k] for tid, hs in first_stage.items()}

    options = [(None, first_stage)] + [({"candidates": c, "weight": w}, reranked(c, w))
                                       for c in CANDIDATES for w in RERANK_WEIGHTS]
    scored = [(score(tune_items, ranked), rr, ranked) for rr, ranked in options]
    best_score, rerank, ranked = max(scored, key=lambda s: _key(s[0], {**result["query"], "rerank": s[1]}))
    result["held_out"]["tuned strategy, no rerank"] = result["held_out"]["tuned"]
    result["held_out"]["tuned"] = score(held, ranked)
    result.update(rerank=rerank, tune_score=best_score,
                  rerank_grid=[{"rerank": rr, "score": s} for s, rr, _ in scored])
