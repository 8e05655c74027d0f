"""``rag tune fusion``: choose how hybrid retrieval fuses dense and BM25 on the user's own
queries, and check the choice on queries it never saw.

The questions with gold passages are split in two by a seeded hash of their ids (``held_out``
fraction, default half). Both rankings are computed once (``candidates`` deep); every fusion in
the grid (`rag.retriever.fuse`: weighted RRF and min-max score fusion, dense weight 0, 0.05, ...,
1) is scored by ``measure`` on the tuning half; the best one is reported on the held-out half
next to dense alone, BM25 alone and equal-weight RRF. The grid contains dense alone (weight 1)
and BM25 alone (weight 0), so on the tuning half the choice is never worse than either input.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from rag.errors import ConfigError
from rag.eval.datasets import EvalItem
from rag.eval.retrieval import mean, per_query
from rag.retriever import fuse
from rag.types import Hit


class _HasId(Protocol):
    @property
    def id(self) -> str: ...


T = TypeVar("T", bound=_HasId)


def split(items: Sequence[T], held_out: float = 0.5, seed: int = 0) -> tuple[list[T], list[T]]:
    """(tuning, held-out) by a seeded hash of each id: stable across runs and machines."""
    def bucket(item: T) -> float:
        digest = hashlib.sha256(f"{seed}:{item.id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64
    tune = [it for it in items if bucket(it) >= held_out]
    held = [it for it in items if bucket(it) < held_out]
    return tune, held


def halves(items: Sequence[EvalItem], held_out: float, seed: int, what: str) -> tuple[list[EvalItem], list[EvalItem]]:
    """(tuning, held-out) halves of ``items``; `ConfigError` when there are too few (``what``
    says which items and how to get them) or a half is empty."""
    if len(items) < 4:
        raise ConfigError(f"tuning needs at least 4 {what}, got {len(items)}")
    tune_items, held = split(items, held_out, seed)
    if not tune_items or not held:
        raise ConfigError(f"held_out={held_out} leaves one half empty; use a fraction between 0 and 1")
    return tune_items, held


def _score(items: Sequence[EvalItem], rankings: dict[str, list[tuple[str, float]]], measure: str) -> float:
    qrels = {it.id: it.judgments for it in items}
    return mean(per_query(qrels, {it.id: rankings[it.id] for it in items}, [measure]), measure)


def _fused(items: Sequence[EvalItem], dense: dict[str, list[Hit]], sparse: dict[str, list[Hit]], k: int,
           **how: Any) -> dict[str, list[tuple[str, float]]]:
    return {it.id: fuse(dense[it.id], sparse[it.id], **how)[:k] for it in items}


def grid(step: float = 0.05, rrf_k: int = 60) -> list[dict[str, Any]]:
    n = round(1 / step)
    return [{"method": m, "dense_weight": round(i / n, 4), "rrf_k": rrf_k}
            for m in ("rrf", "minmax") for i in range(n + 1)]


def tune(items: Sequence[EvalItem], dense: dict[str, list[Hit]], sparse: dict[str, list[Hit]], *,
         measure: str = "ndcg@10", held_out: float = 0.5, seed: int = 0, depth: int = 100,
         step: float = 0.05) -> dict[str, Any]:
    """Pick the fusion on the tuning half; score it and the baselines on the held-out half.

    ``dense`` and ``sparse`` map question ids to each retriever's ranking. Returns the chosen
    settings (``fusion``), every grid point's tuning score and the held-out table."""
    tune_items, held = halves([it for it in items if it.gold_ids], held_out, seed,
                              "questions with gold passages (give a question set with gold passages or --qrels)")
    scored = [(_score(tune_items, _fused(tune_items, dense, sparse, depth, **g), measure), g) for g in grid(step)]
    # best score; among equals the weight nearest 0.5 (both sides), then rrf
    best_score, best = max(scored, key=lambda sg: (round(sg[0], 10), -abs(sg[1]["dense_weight"] - 0.5),
                                                    sg[1]["method"] == "rrf"))

    def ranks(hits: dict[str, list[Hit]]) -> dict[str, list[tuple[str, float]]]:
        return {it.id: [(h.passage.id, h.score) for h in hits[it.id][:depth]] for it in held}

    table = {"dense": _score(held, ranks(dense), measure), "bm25": _score(held, ranks(sparse), measure),
             "rrf (equal weights)": _score(held, _fused(held, dense, sparse, depth, method="rrf",
                                                        dense_weight=0.5, rrf_k=60), measure),
             "tuned": _score(held, _fused(held, dense, sparse, depth, **best), measure)}
    return {"measure": measure, "fusion": best, "tune_score": best_score, "tune_queries": len(tune_items),
            "held_out_queries": len(held), "held_out": table,
            "grid": [{**g, "score": s} for s, g in scored]}


def tune_on_index(folder: str | Path, items: Sequence[EvalItem], *, measure: str = "ndcg@10",
                  held_out: float = 0.5, seed: int = 0, depth: int = 100) -> dict[str, Any]:
    """`tune` on the dense and BM25 rankings of an index folder (``depth`` candidates each)."""
    from rag.retriever import BM25Retriever, DenseRetriever

    queries, ids = [it.question for it in items], [it.id for it in items]
    dense = dict(zip(ids, DenseRetriever.from_folder(folder).search_batch(queries, depth), strict=True))
    sparse = dict(zip(ids, BM25Retriever(folder).search_batch(queries, depth), strict=True))
    return tune(items, dense, sparse, measure=measure, held_out=held_out, seed=seed, depth=depth)
