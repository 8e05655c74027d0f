"""Self-RAG critique scores as pure functions over numbers (no model needed).

Probabilities come from log-probabilities of token ids at one generated position; a token
missing from a position counts as probability exp(-100) (never as -100). Each group is
renormalised within itself:

- ``s_rel = p(Relevant) / (p(Relevant) + p(Irrelevant))`` at the first generated position
- ``s_sup = p(Full)/S + 0.5 * p(Partial)/S`` at the first position whose token is an IsSup token
- ``s_use = sum_k w_k * p(Utility:k)/S``, ``w = [-1, -0.5, 0, 0.5, 1]``, at the first Utility
- ``seq = exp(mean token logprob)``
- ``total = seq + w_rel * s_rel + w_sup * s_sup + w_use * s_use``
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rag.types import Generation

MISSING_LOGPROB = -100.0
UTILITY_WEIGHTS = (-1.0, -0.5, 0.0, 0.5, 1.0)


@dataclass(frozen=True, slots=True)
class Weights:
    rel: float = 1.0
    sup: float = 1.0
    use: float = 0.5
    seq: bool = True


def prob(step: Mapping[int, float], token_id: int) -> float:
    return math.exp(step.get(token_id, MISSING_LOGPROB))


def normalised(step: Mapping[int, float], ids: Sequence[int]) -> list[float]:
    """Probabilities of ``ids`` at one position, renormalised to sum to 1 within the group."""
    ps = [prob(step, i) for i in ids]
    total = sum(ps)
    return [p / total for p in ps]


def retrieval_probability(step: Mapping[int, float], retrieval: int, no_retrieval: int) -> float:
    """Paper Eq. 8 on probabilities: p([Retrieval]) / (p([Retrieval]) + p([No Retrieval]))."""
    return normalised(step, [retrieval, no_retrieval])[0]


def should_retrieve(step: Mapping[int, float], retrieval: int, no_retrieval: int,
                    threshold: float, *, compat_log_ratio: bool = False) -> tuple[bool, float]:
    """The adaptive retrieval decision and the number it was made on.

    ``compat_log_ratio`` reproduces the reference script, which divided raw log-probabilities
    (lp_ret / (lp_ret + lp_noret)); since both are negative this grows as retrieval becomes
    *less* likely, inverting the rule. Only for reproducing published runs.
    """
    if compat_log_ratio:
        lr = step.get(retrieval, MISSING_LOGPROB)
        ln = step.get(no_retrieval, MISSING_LOGPROB)
        ratio = lr / (lr + ln) if (lr + ln) != 0 else 0.0
        return ratio > threshold, ratio
    p = retrieval_probability(step, retrieval, no_retrieval)
    return p > threshold, p


def first_position(token_ids: Sequence[int], group: Sequence[int]) -> int | None:
    """Index of the first generated token that belongs to ``group``."""
    members = set(group)
    return next((i for i, t in enumerate(token_ids) if t in members), None)


def relevance_score(probs: Sequence[float]) -> float:
    """``probs`` = normalised (relevant, irrelevant)."""
    return probs[0]


def support_score(probs: Sequence[float]) -> float:
    """``probs`` = normalised (fully, partially, no support)."""
    return probs[0] + 0.5 * probs[1]


def utility_score(probs: Sequence[float]) -> float:
    """``probs`` = normalised (Utility:1 .. Utility:5)."""
    return sum(w * p for w, p in zip(UTILITY_WEIGHTS, probs, strict=True))


def sequence_score(token_logprobs: Sequence[float]) -> float:
    """exp(mean token log-probability); 0 for an empty generation."""
    vals = [lp for lp in token_logprobs if not math.isnan(lp)]
    return math.exp(sum(vals) / len(vals)) if vals else 0.0


@dataclass(frozen=True, slots=True)
class Critique:
    s_rel: float
    s_sup: float | None  # None: not asked (a prompted critic's only candidate)
    s_use: float | None
    seq: float
    total: float


def combine(s_rel: float, s_sup: float | None, s_use: float | None, seq: float, w: Weights) -> Critique:
    total = (seq if w.seq else 0.0) + w.rel * s_rel + w.sup * (s_sup or 0.0) + w.use * (s_use or 0.0)
    return Critique(s_rel=s_rel, s_sup=s_sup, s_use=s_use, seq=seq, total=total)


def critique_generation(gen: Generation, *, relevant: int, irrelevant: int,
                        support: Sequence[int], utility: Sequence[int], w: Weights) -> Critique:
    """Score one candidate from the reflection-token logprobs its generation carries."""
    steps = gen.logprobs
    s_rel = relevance_score(normalised(steps[0], [relevant, irrelevant])) if steps else 0.0
    pos = first_position(gen.token_ids, support)
    s_sup = support_score(normalised(steps[pos], support)) if pos is not None and pos < len(steps) else 0.0
    pos = first_position(gen.token_ids, utility)
    s_use = utility_score(normalised(steps[pos], utility)) if pos is not None and pos < len(steps) else 0.0
    return combine(s_rel, s_sup, s_use, sequence_score(gen.token_logprobs), w)


_REFLECTION_RE = re.compile(r"\[(No Retrieval|Retrieval|Continue to Use Evidence|Irrelevant|"
                            r"Relevant|Utility:[1-5]|Fully supported|Partially supported|"
                            r"No support / Contradictory)\]|</?paragraph>|</s>")


def strip_reflection(text: str, *, keep_continue: bool = False) -> str:
    """Remove reflection tokens, paragraph tags, ``</s>``; optionally keep
    ``[Continue to Use Evidence]`` (long-form uses it as a citation cue)."""
    def repl(m: re.Match[str]) -> str:
        return m.group(0) if keep_continue and m.group(0) == "[Continue to Use Evidence]" else ""
    return _REFLECTION_RE.sub(repl, text)


CONTINUE = "[Continue to Use Evidence]"
_NO_SPACE_AFTER_STOP = re.compile(r"(?<=\w)([.!?])(?=[^\W\d])")


def fix_spacing(text: str) -> str:
    """A space after a full stop, question or exclamation mark written between a word character
    and a letter ("1900.Alpha" -> "1900. Alpha"), as the reference's ``utils.fix_spacing`` does
    to long-form output, so ALCE's sentence splitter sees two sentences; unlike it, never inside
    a number ("3.5" stays)."""
    return _NO_SPACE_AFTER_STOP.sub(r"\1 ", text)


def postprocess(text: str) -> str:
    """Short-form answer: no control tokens, no newlines, trimmed."""
    return " ".join(strip_reflection(text).split())


# a choice label: the bare letter, "(A)", "A)", "A." or "A:" (then anything); never "A bird ..."
_CHOICE = re.compile(r"^\(?([A-E])(?:\)|[.:]|\s*$)")
_VERDICTS = {"true": "true", "false": "false", "yes": "true", "no": "false",
             "supports": "true", "refutes": "false"}


def normalise_closed_answer(text: str, choices: Sequence[tuple[str, str]] | None = None) -> str:
    """Key for voting and scoring closed tasks.

    A choice label (``A``, ``(B)``, ``C.``, ``D: text``; upper case only, so "A bird is ..." is
    not option A) gives the letter; with ``choices`` (label, text) an answer that starts with an
    option's text gives that option's label. A leading true/false/yes/no/SUPPORTS/REFUTES gives
    ``true`` or ``false`` (PubHealth's FEVER-style labels). Otherwise the text lower-cased
    without punctuation.
    """
    t = text.strip()
    m = _CHOICE.match(t)
    if m:
        return m.group(1)
    low = t.lower().translate(str.maketrans("", "", string.punctuation)).split()
    for label, option in choices or ():
        key = option.lower().translate(str.maketrans("", "", string.punctuation)).split()
        if key and low[: len(key)] == key:
            return label
    if low and low[0] in _VERDICTS:
        return _VERDICTS[low[0]]
    return " ".join(low)


def is_label(key: str) -> bool:
    """A normalised closed answer that is a label (an option letter, ``true`` or ``false``)."""
    return key in _VERDICTS.values() or (len(key) == 1 and key in "ABCDE")


def vote(answers: Sequence[str], totals: Sequence[float]) -> tuple[str, dict[str, float]]:
    """Closed tasks: sum scores of candidates with the same normalised answer; return the
    winning normalised answer and every group's sum."""
    sums: dict[str, float] = {}
    for a, s in zip(answers, totals, strict=True):
        key = normalise_closed_answer(a)
        sums[key] = sums.get(key, 0.0) + s
    best = max(sums.items(), key=lambda kv: kv[1])[0]
    return best, sums
