"""Answer metrics as pure functions (SQuAD EM/F1, Self-RAG match), and bootstrap intervals.
Retrieval measures live in `rag.eval.retrieval` (trec_eval through ir-measures).

>>> exact_match("the Broncos.", ["Denver Broncos", "Broncos"])
1.0
>>> match("It was Paris", ["Paris"])
1.0
"""

from __future__ import annotations

import functools
import random
import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

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


@functools.cache
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, golds: Sequence[str]) -> float:
    """ROUGE-L F-measure (longest common subsequence, Porter-stemmed tokens) by Google's
    ``rouge-score``, max over gold answers; for long answers, where exact match means nothing.

    >>> round(rouge_l("the cat sat on the mat", ["the cat was on the mat"]), 3)
    0.833
    """
    scorer = _rouge_scorer()
    return max((scorer.score(g, prediction)["rougeL"].fmeasure for g in golds), default=0.0)


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
