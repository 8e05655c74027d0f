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
import random
import re
import string
from collections import Counter
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


# --- answer metrics -------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation and articles, collapse whitespace.

    >>> normalize_answer("The  Eiffel-Tower!")
    'eiffeltower'
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals a normalised gold answer.

    >>> exact_match("the Broncos", ["Denver Broncos", "Broncos"])
    1.0
    """
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(g) for g in golds))


def f1(prediction: str, golds: Sequence[str]) -> float:
    """Token F1 after SQuAD normalisation, max over gold answers (0 for an empty prediction).

    >>> round(f1("Denver Broncos won", ["Denver Broncos"]), 3)
    0.8
    """
    pred = normalize_answer(prediction).split()
    best = 0.0
    for g in golds:
        gold = normalize_answer(g).split()
        common = sum((Counter(pred) & Counter(gold)).values())
        if not pred or not gold or common == 0:
            best = max(best, float(pred == gold))
            continue
        precision, recall = common / len(pred), common / len(gold)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def match(prediction: str, golds: Sequence[str]) -> float:
    """Self-RAG "accuracy": 1.0 if any gold string occurs in the prediction, case-sensitive as
    in the paper's scripts.

    >>> match("It is in Paris.", ["paris"]), match("It is in Paris.", ["Paris"])
    (0.0, 1.0)
    """
    return float(any(g in prediction for g in golds))


def match_normalized(prediction: str, golds: Sequence[str]) -> float:
    """`match` after SQuAD normalisation of both sides.

    >>> match_normalized("It is in Paris.", ["paris"])
    1.0
    """
    p = normalize_answer(prediction)
    return float(any(normalize_answer(g) and normalize_answer(g) in p for g in golds))


def bootstrap_ci(values: Sequence[float], *, n: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean.

    >>> bootstrap_ci([1.0, 1.0, 1.0])
    (1.0, 1.0)
    """
    if not values:
        return (0.0, 0.0)
    rng = random.Random(seed)
    k = len(values)
    means = sorted(sum(values[rng.randrange(k)] for _ in range(k)) / k for _ in range(n))
    lo = means[int((1 - level) / 2 * n)]
    hi = means[min(n - 1, int((1 + level) / 2 * n))]
    return (lo, hi)
