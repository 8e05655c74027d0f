"""Calibrate how a Self-RAG pipeline picks among its candidates, from an eval run's predictions.

Every short-form record holds each candidate's text and scores (IsRel, IsSup, IsUse, sequence,
and the retrieval prior 1/rank), so any weighting can be replayed offline: the candidate with the
highest ``w_rel*s_rel + w_sup*s_sup + w_use*s_use + [seq] + w_ret*s_ret`` is the answer. The
weights are chosen on a tuning split of the questions (seeded hash of the ids, as `rag tune
fusion`) and reported on the held-out rest, next to the paper's weights, the top-ranked passage's
candidate, and the oracle (the best candidate each time: the ceiling of any critic).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rag.errors import ConfigError
from rag.eval.fusion import split
from rag.eval.metrics import exact_match, f1, match, match_normalized
from rag.eval.records import EvalRecord, predictions_file, read_predictions

METRICS = {"match": match, "match_norm": match_normalized, "em": exact_match, "f1": f1}
PAPER = {"w_rel": 1.0, "w_sup": 1.0, "w_use": 0.5, "use_seq": True, "w_ret": 0.0}
TOP_RANKED = {"w_rel": 0.0, "w_sup": 0.0, "w_use": 0.0, "use_seq": False, "w_ret": 1.0}


class Question:
    """One question's candidates, each candidate's score under every metric."""

    def __init__(self, record: EvalRecord, metric: str):
        self.id = record.id
        self.candidates = record.scores
        score = METRICS[metric]
        self.values = [score(c["text"], record.gold) for c in self.candidates]


def total(c: dict[str, Any], w: dict[str, Any]) -> float:
    return (w["w_rel"] * c["s_rel"] + w["w_sup"] * (c["s_sup"] or 0.0) + w["w_use"] * (c["s_use"] or 0.0)
            + (c["seq"] if w["use_seq"] else 0.0) + w["w_ret"] * c.get("s_ret", 0.0))


def value(questions: Sequence[Question], w: dict[str, Any]) -> float:
    """Mean metric of the candidates ``w`` picks (first of equal totals, as the decoder does)."""
    if not questions:
        return float("nan")
    picked = 0.0
    for q in questions:
        totals = [total(c, w) for c in q.candidates]
        picked += q.values[totals.index(max(totals))]
    return picked / len(questions)


def grid() -> list[dict[str, Any]]:
    rel = sup = (0.0, 0.5, 1.0, 2.0, 4.0)
    use = (0.0, 0.5, 1.0, 2.0)
    ret = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    return [{"w_rel": a, "w_sup": b, "w_use": c, "use_seq": d, "w_ret": e}
            for a, b, c, d, e in itertools.product(rel, sup, use, (True, False), ret)]


def screen_grid() -> list[dict[str, Any]]:
    """``candidates: 1``: only the screen's ``w_rel*s_rel + w_ret/rank`` picks the passage (the one
    candidate generated), so only those two weights matter."""
    rel = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
    ret = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    return [{"w_rel": a, "w_sup": 0.0, "w_use": 0.0, "use_seq": False, "w_ret": e}
            for a, e in itertools.product(rel, ret) if a or e]


def read_candidates(path: Path) -> list[EvalRecord]:
    """The short-form records (with candidates) of a run's predictions.jsonl."""
    file = predictions_file(path)
    with_candidates = [r for r in read_predictions(file) if len(r.scores) > 1 and r.gold]
    if not with_candidates:
        raise ConfigError(f"{file} has no questions with several scored candidates and gold answers; "
                          "run rag eval with a Self-RAG short-form pipeline (kind: selfrag) on a set with answers")
    if not all("s_ret" in c for r in with_candidates for c in r.scores):
        raise ConfigError(f"{file} was written before candidates carried their retrieval prior (s_ret); "
                          "rerun rag eval")
    return with_candidates


def tune(records: Sequence[EvalRecord], *, metric: str = "match", held_out: float = 0.5,
         seed: int = 0, baseline: Sequence[EvalRecord] | None = None, screen: bool = False) -> dict[str, Any]:
    """The weights that maximise ``metric`` on the tuning split (ties: the simplest, first in
    the grid), and each reference weighting on both splits; ``baseline`` (another pipeline's
    records on the same questions, e.g. naive RAG) is scored on the same two splits.

    ``screen``: tune the relevance screen of ``candidates: 1`` instead (from a run with every
    candidate: the screened pick is the candidate the screen ranks first); the weights then
    hold ``candidates``, ``w_rel`` and ``w_ret``."""
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; use {', '.join(METRICS)}")
    questions = [Question(r, metric) for r in records]
    tuning, held = split(questions, held_out, seed)
    if len(tuning) < 10 or not held:
        raise ConfigError(f"only {len(tuning)} tuning and {len(held)} held-out questions; run rag eval on "
                          "more questions (at least 20) or change --held-out")
    best = max(screen_grid() if screen else grid(), key=lambda w: value(tuning, w))

    def row(w: dict[str, Any]) -> dict[str, float]:
        return {"tune": value(tuning, w), "held_out": value(held, w)}

    def ceiling(qs: Sequence[Question]) -> float:
        return sum(max(q.values) for q in qs) / len(qs)

    weights = {"candidates": 1, "w_rel": best["w_rel"], "w_ret": best["w_ret"]} if screen else best
    result = {"weights": weights, "metric": metric, "tune_questions": len(tuning), "held_out_questions": len(held),
              "tuned": row(best), "paper": row(PAPER), "top_ranked": row(TOP_RANKED),
              "oracle": {"tune": ceiling(tuning), "held_out": ceiling(held)}}
    if baseline is not None:
        by_id = {r.id: METRICS[metric](r.prediction, r.gold) for r in baseline}
        missing = [q.id for q in questions if q.id not in by_id]
        if missing:
            raise ConfigError(f"the baseline run lacks {len(missing)} of the questions (e.g. {missing[0]}); "
                              "run both pipelines on the same question set")
        result["baseline"] = {name: sum(by_id[q.id] for q in qs) / len(qs)
                              for name, qs in (("tune", tuning), ("held_out", held))}
    return result
