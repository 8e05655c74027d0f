"""Mistral-7B-v0.2 fine-tuning formats: conversations as ``{"interactions": [{"is_user": bool,
"text": str}, ...]}`` JSONL lines, and plain ``{"text": str}`` lines.

`read_interactions` reads conversations (errors name file and line); `to_interactions` and
`to_text` export a conversation (a chat transcript or an eval record) in either form.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rag.corpus import json_lines
from rag.errors import CorpusError, PromptError
from rag.types import ChatMessage


def read_interactions(path: str | Path) -> Iterator[list[ChatMessage]]:
    """Yield each line's conversation as chat messages (``is_user`` -> user, else assistant)."""
    p = Path(path)
    if not p.exists():
        raise CorpusError(f"conversation file not found: {p}")
    for lineno, obj in json_lines(p):
        if isinstance(obj, CorpusError):
            raise obj
        turns = obj.get("interactions")
        if not isinstance(turns, list) or not turns:
            raise CorpusError("expected a non-empty 'interactions' list", source=str(p), line=lineno)
        messages = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or not isinstance(t.get("is_user"), bool) or not isinstance(t.get("text"), str):
                raise CorpusError(f"interactions[{i}] must be {{\"is_user\": bool, \"text\": str}}",
                                  source=str(p), line=lineno)
            messages.append(ChatMessage(role="user" if t["is_user"] else "assistant", content=t["text"]))
        yield messages


def to_interactions(messages: Sequence[ChatMessage]) -> dict[str, Any]:
    """A conversation as one ``interactions`` record (system messages have no place there and
    are refused)."""
    out = []
    for i, m in enumerate(messages):
        if m.role not in ("user", "assistant"):
            raise PromptError(f"messages[{i}] has role {m.role!r}; the interactions format has only "
                              "user and assistant turns")
        out.append({"is_user": m.role == "user", "text": m.content})
    return {"interactions": out}


def to_text(messages: Sequence[ChatMessage]) -> dict[str, Any]:
    """A conversation as one ``{"text": ...}`` record in the Mistral ``[INST]`` layout."""
    from rag.prompts import MistralInstFormat

    if not messages or messages[-1].role != "assistant":
        raise PromptError("a {\"text\"} record needs a conversation that ends with the assistant")
    fmt = MistralInstFormat()
    return {"text": fmt.conversation(list(messages))}
