"""Neutralising control strings in untrusted text (user turns, retrieved passages).

A tokenizer turns the literal text ``[Retrieval]`` or ``<|im_start|>`` into a real control token,
so a passage containing it could steer the model. `neutralize` *escapes* every such string by
inserting a space after its opening character (``[Retrieval]`` -> ``[ Retrieval]``,
``<|im_start|>`` -> ``< |im_start|>``, ``<s>`` -> ``< s>``): the text stays readable and no longer
matches any special token. Nothing else in the text changes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

REFLECTION_TOKENS = (
    "[No Retrieval]", "[Retrieval]", "[Continue to Use Evidence]",
    "[Irrelevant]", "[Relevant]", "<paragraph>", "</paragraph>",
    "[Utility:1]", "[Utility:2]", "[Utility:3]", "[Utility:4]", "[Utility:5]",
    "[Fully supported]", "[Partially supported]", "[No support / Contradictory]",
)
CHAT_CONTROL = ("[INST]", "[/INST]", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<|endoftext|>",
                "<unk>", "<pad>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                "<|end_header_id|>")
DEFAULT_CONTROL = REFLECTION_TOKENS + CHAT_CONTROL


@lru_cache(maxsize=32)
def _pattern(tokens: tuple[str, ...]) -> re.Pattern[str]:
    ordered = sorted({t for t in tokens if len(t) >= 2}, key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in ordered))


def tokenizer_control_strings(tokenizer: Any) -> tuple[str, ...]:
    """Every special / added token string a tokenizer would turn into a control token."""
    found: set[str] = set(getattr(tokenizer, "all_special_tokens", []) or [])
    added = getattr(tokenizer, "get_added_vocab", None)
    if callable(added):
        found.update(added())
    return tuple(sorted(t for t in found if t and not t.isspace()))


def neutralize(text: str, extra: Iterable[str] = ()) -> str:
    """Escape control strings (reflection tokens, chat markers, ``extra``) in untrusted text."""
    pattern = _pattern(DEFAULT_CONTROL + tuple(extra))
    return pattern.sub(lambda m: m.group(0)[0] + " " + m.group(0)[1:], text)
