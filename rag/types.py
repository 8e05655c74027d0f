"""Pydantic models that cross module boundaries."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Passage(_Frozen):
    """One retrievable unit of text."""

    id: str
    title: str = ""
    text: str
    meta: dict[str, Any] = Field(default_factory=dict)


class Hit(_Frozen):
    """A passage returned by a retriever, with its score and 1-based rank."""

    passage: Passage
    score: float
    rank: int

    def to_json(self) -> dict[str, Any]:
        p = self.passage
        return {"id": p.id, "title": p.title, "text": p.text, "score": self.score,
                "rank": self.rank, "meta": p.meta}


Role = Literal["system", "user", "assistant"]


class ChatMessage(_Frozen):
    role: str
    content: str
