"""``rag tune query``: choose how conversations are searched (``retrieval.query``) on the user's
own conversational turns, and check the choice on turns it never saw.

The turns with gold passages are split by a seeded hash of their ids (`rag.eval.fusion.split`).
Every query a strategy can send (the last turn; the last turn joined to the 1 or 2 messages before
it, or to every earlier user turn) is searched once, ``depth`` deep, with the pipeline's retriever.
The grid is ``last_turn`` and ``history`` at every (``history_messages``, ``history_weight``);
the best on the tuning half by ``measure`` (ties: ``last_turn``, then the lighter weight) is
reported on the held-out half next to ``last_turn``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rag.eval.datasets import EvalItem
from rag.eval.fusion import _score, halves
from rag.pipeline import history_query
from rag.prompts import last_user_message
from rag.retriever import Retriever, fuse
from rag.types import Hit

WEIGHTS = (0.1, 0.2, 0.3, 0.4, 0.5)
MESSAGES = (1, 2, 0)


def _ranking(last: list[Hit], joined: list[Hit] | None, weight: float, depth: int) -> list[tuple[str, float]]:
    if joined is None or weight == 0:
        return [(h.passage.id, h.score) for h in last[:depth]]
    return fuse(last, joined, method="rrf", dense_weight=1.0 - weight)[:depth]


def tune_query(items: Sequence[EvalItem], retriever: Retriever, *, measure: str = "ndcg@10",
               held_out: float = 0.5, seed: int = 0, depth: int = 100) -> dict[str, Any]:
    """The grid's best strategy on the tuning half, and the held-out table."""
    turns = [it for it in items if it.gold_ids and it.messages]
    tune_items, held = halves(turns, held_out, seed, "conversational turns with gold passages (give a "
                              "conversational folder: conversations.jsonl + qrels.tsv)")
    queries = {(it.id, n): history_query(it.messages or [], n) for it in turns for n in MESSAGES}
    last = {it.id: last_user_message(it.messages or []) for it in turns}
    texts = sorted({*queries.values(), *last.values()})
    found = dict(zip(texts, retriever.search_batch(texts, depth), strict=True))

    def rankings(group: Sequence[EvalItem], n: int | None, w: float) -> dict[str, list[tuple[str, float]]]:
        out = {}
        for it in group:
            joined = queries[(it.id, n)] if n is not None else last[it.id]
            second = found[joined] if joined != last[it.id] else None
            out[it.id] = _ranking(found[last[it.id]], second, w, depth)
        return out

    grid: list[dict[str, Any]] = [{"query": "last_turn"}] + [
        {"query": "history", "history_messages": n, "history_weight": w} for n in MESSAGES for w in WEIGHTS]

    def score(group: Sequence[EvalItem], g: dict[str, Any]) -> float:
        return _score(group, rankings(group, g.get("history_messages"), g.get("history_weight", 0.0)), measure)

    scored = [(score(tune_items, g), g) for g in grid]
    best_score, best = max(scored, key=lambda sg: (round(sg[0], 10), sg[1]["query"] == "last_turn",
                                                   -sg[1].get("history_weight", 0.0)))
    table = {"last_turn": score(held, grid[0]), "tuned": score(held, best)}
    return {"measure": measure, "query": best, "tune_score": best_score, "tune_queries": len(tune_items),
            "held_out_queries": len(held), "held_out": table, "grid": [{**g, "score": s} for s, g in scored]}
