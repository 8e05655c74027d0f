"""Retrieval and answer metrics as pure functions.

>>> ndcg_at_k(["d1", "d2"], {"d2": 1}, 10)   # one relevant document at rank 2
0.6309297535714575
>>> recall_at_k(["d1", "d2", "d3"], {"d3", "d9"}, 2)
0.0
>>> mrr_at_k(["d1", "d2"], {"d2"}, 10)
0.5
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def ndcg_at_k(ranked_ids: Sequence[str], relevance: Mapping[str, float], k: int = 10) -> float:
    """BEIR/trec_eval nDCG@k with graded relevance (gain = relevance, log2 discount)."""
    dcg = sum(relevance.get(d, 0.0) / math.log2(i + 2) for i, d in enumerate(ranked_ids[:k]))
    ideal = sorted((r for r in relevance.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked_ids: Sequence[str], relevant: Sequence[str] | set[str] | Mapping[str, float],
                k: int) -> float:
    """Fraction of the relevant ids found in the top k (BEIR's recall@k)."""
    rel = {d for d in relevant if not isinstance(relevant, Mapping) or relevant[d] > 0}
    return len(rel & set(ranked_ids[:k])) / len(rel) if rel else 0.0


def hit_at_k(ranked_ids: Sequence[str], relevant: set[str] | Sequence[str], k: int) -> float:
    """1.0 if any relevant id is in the top k (the QA "recall@k" of DPR papers)."""
    return 1.0 if set(relevant) & set(ranked_ids[:k]) else 0.0


def mrr_at_k(ranked_ids: Sequence[str], relevant: set[str] | Sequence[str], k: int = 10) -> float:
    """Reciprocal rank of the first relevant id in the top k (0 when none)."""
    rel = set(relevant)
    for i, d in enumerate(ranked_ids[:k]):
        if d in rel:
            return 1.0 / (i + 1)
    return 0.0
