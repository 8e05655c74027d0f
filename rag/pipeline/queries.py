"""What a conversation is searched with (``retrieval.query``): each strategy as a `QueryPlan`
(one or two texts, their fusion weight, the reranker's query), shared by the pipelines and
``rag tune query`` so that tuning measures exactly what serving runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rag.prompts import last_user_message
from rag.retriever import fuse
from rag.types import ChatMessage, Hit

if TYPE_CHECKING:
    from rag.config import RetrievalConfig


def history_query(messages: Sequence[ChatMessage], n: int) -> str:
    """The last user turn after the ``n`` user and assistant messages before it (0: every earlier
    user turn), joined by spaces: the second query of ``retrieval.query: history``."""
    last = max(i for i, m in enumerate(messages) if m.role == "user")
    before = [m for m in messages[:last] if m.role in ("user", "assistant")]
    before = before[-n:] if n else [m for m in before if m.role == "user"]
    return " ".join([*(m.content for m in before), messages[last].content])


@dataclass(frozen=True)
class QueryPlan:
    """``first``'s ranking, fused with ``second``'s (weight ``weight``) when there is a second,
    different text; a reranker scores the candidates against ``rerank_by``."""

    first: str
    second: str | None
    weight: float
    rerank_by: str

    @property
    def fused(self) -> bool:
        return self.second is not None and self.second != self.first

    @property
    def shown(self) -> str:
        """The query as the answer's trace records it."""
        return f"{self.first} || {self.second}" if self.fused else self.first


def query_plan(r: RetrievalConfig, messages: Sequence[ChatMessage], written: str | None = None) -> QueryPlan:
    """The plan of strategy ``r.query`` for one conversation; ``written`` is the generator's
    rewrite (``rewrite``) or passage (``hyde``)."""
    last = last_user_message(messages)
    if r.query in ("rewrite", "hyde") and written is None:
        raise ValueError(f"retrieval.query: {r.query} plans need the generator's text")
    if r.query == "rewrite":
        return QueryPlan(written or last, None, 0.0, written or last)
    if r.query == "hyde":
        return QueryPlan(last, written, r.hyde_weight, last)
    if r.query == "history":
        joined = history_query(messages, r.history_messages)
        return QueryPlan(last, joined, r.history_weight, joined)
    return QueryPlan(last, None, 0.0, last)


def plan_texts(plans: Sequence[QueryPlan]) -> list[str]:
    """Every distinct text the plans search, once."""
    return list(dict.fromkeys(t for p in plans for t in (p.first, p.second) if t is not None))


def search_depth(plans: Sequence[QueryPlan], k: int) -> int:
    """How deep to search for the plans' top ``k``: deeper where two rankings are fused."""
    return max(2 * k, 20) if any(p.fused for p in plans) else k


def planned_hits(plans: Sequence[QueryPlan], found: Mapping[str, Sequence[Hit]], k: int) -> list[list[Hit]]:
    """Each plan's top ``k`` from the rankings ``found`` of its texts (weighted reciprocal-rank
    fusion of two)."""
    out = []
    for p in plans:
        if not p.fused:
            out.append(list(found[p.first][:k]))
            continue
        a, b = found[p.first], found[p.second or ""]
        by_id = {h.passage.id: h.passage for h in [*a, *b]}
        out.append([Hit(passage=by_id[pid], score=score, rank=n + 1)
                    for n, (pid, score) in enumerate(fuse(a, b, method="rrf", dense_weight=1.0 - p.weight)[:k])])
    return out
