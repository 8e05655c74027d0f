"""Paired significance tests between pipelines on per-query scores.

Test: the two-sided paired randomization (permutation) test on the mean per-query difference,
the test Smucker, Allan and Carterette (CIKM 2007) recommend for IR metrics; computed by
``scipy.stats.permutation_test`` with ``permutation_type="samples"`` (each query's pair of
scores is swapped or not), 10,000 resamples, a fixed seed. Correction: within each metric, the
p-values of all pipeline pairs are adjusted by Benjamini-Hochberg
(``scipy.stats.false_discovery_control``), so "significant" (adjusted p < 0.05) bounds the false
discovery rate over the comparisons a report shows.

Only queries scored in both pipelines take part (paired by question id).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rag.errors import ConfigError
from rag.eval.records import EvalRecord, read_predictions

PerQuery = Mapping[str, Mapping[str, float]]  # question id -> metric -> value
ALPHA = 0.05
TEST = "paired randomization test (10,000 resamples), Benjamini-Hochberg within each metric"


def paired_p_value(a: Sequence[float], b: Sequence[float], *, resamples: int = 10_000, seed: int = 0) -> float:
    """Two-sided p-value that paired samples ``a`` and ``b`` have the same mean."""
    import numpy as np
    from scipy.stats import permutation_test

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError("paired samples need the same, non-zero length")
    if np.allclose(x, y):
        return 1.0
    res = permutation_test((x, y), lambda u, v, axis: np.mean(u - v, axis=axis), vectorized=True,
                           permutation_type="samples", n_resamples=resamples, alternative="two-sided",
                           random_state=np.random.default_rng(seed))
    return float(res.pvalue)


def compare(per_pipeline: Mapping[str, PerQuery], metrics: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Every pair of pipelines on every metric both scored: means, difference, p-value and the
    Benjamini-Hochberg adjusted p-value (within the metric)."""
    from scipy.stats import false_discovery_control

    names = list(per_pipeline)
    shared = metrics or sorted({m for scores in per_pipeline.values() for q in scores.values() for m in q})
    rows: list[dict[str, Any]] = []
    for metric in shared:
        block = []
        for a, b in itertools.combinations(names, 2):
            ids = [q for q, v in per_pipeline[a].items() if metric in v and metric in per_pipeline[b].get(q, {})]
            if len(ids) < 2:
                continue
            xa = [per_pipeline[a][q][metric] for q in ids]
            xb = [per_pipeline[b][q][metric] for q in ids]
            block.append({"metric": metric, "a": a, "b": b, "n": len(ids), "mean_a": sum(xa) / len(ids),
                          "mean_b": sum(xb) / len(ids), "diff": (sum(xa) - sum(xb)) / len(ids),
                          "p": paired_p_value(xa, xb)})
        if block:
            adjusted = false_discovery_control([r["p"] for r in block], method="bh")
            for r, p in zip(block, adjusted, strict=True):
                r["p_adjusted"] = float(p)
                r["significant"] = bool(p < ALPHA)
            rows += block
    return rows


def per_query_scores(records: Sequence[EvalRecord]) -> PerQuery:
    """Per-question metrics of one pipeline's records."""
    return {r.id: r.metrics for r in records}


def load_runs(folders: Sequence[str | Path]) -> dict[str, PerQuery]:
    """Per-query scores of every pipeline in earlier run folders (``rag eval --out``), named
    ``<folder>/<pipeline>``."""
    out: dict[str, PerQuery] = {}
    for folder in map(Path, folders):
        summary = folder / "summary.json"
        if not summary.exists():
            raise ConfigError(f"{summary} not found: give folders written by rag eval --out")
        for p in json.loads(summary.read_text())["pipelines"]:
            out[f"{folder.name}/{p['pipeline']}"] = per_query_scores(read_predictions(folder / p["pipeline"]))
    return out

