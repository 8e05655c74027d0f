"""A scripted generator: outputs and logprobs written by hand, for exact tests and demos.

A script maps a prompt (exact string, or a callable test) to the `Generation` to return.
Unmatched prompts get ``default``. Tokenization is a tiny word-level vocabulary built on the fly
so `rag.selfrag` can look reflection tokens up by string.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from rag.errors import GenerationError
from rag.types import Generation, GenerationParams


class ScriptedTokenizer:
    """Maps strings to stable ids; special tokens are whole strings."""

    def __init__(self, special_tokens: Sequence[str] = ()):
        self.vocab: dict[str, int] = {"<unk>": 0, "</s>": 1}
        for t in special_tokens:
            self.vocab.setdefault(t, len(self.vocab))
        self.additional_special_tokens = list(special_tokens)
        self.eos_token, self.eos_token_id = "</s>", 1
        self.unk_token_id = 0

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.vocab.get(token, 0)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def decode(self, ids: list[int], **_: object) -> str:
        inverse = {v: k for k, v in self.vocab.items()}
        return "".join(inverse.get(i, "") for i in ids)

    def id_of(self, token: str) -> int:
        return self.vocab.setdefault(token, len(self.vocab))


Match = str | Callable[[str], bool]


class ScriptedGenerator:
    """Returns scripted `Generation`s; records every prompt it was given in ``calls``."""

    model_name = "scripted"

    def __init__(self, script: Sequence[tuple[Match, Generation | Callable[[str], Generation]]] = (),
                 default: Generation | Callable[[str], Generation] | None = None,
                 tokenizer: Any = None):
        self.script = list(script)
        self.default = default
        self._tokenizer = tokenizer or ScriptedTokenizer()
        self.calls: list[list[str]] = []
        self.delay_s = 0.0  # simulated generation time per call (service tests)
        self.stream_delay_s = 0.0

    def load(self) -> ScriptedGenerator:
        return self

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def _one(self, prompt: str) -> Generation:
        for match, out in self.script:
            if (match(prompt) if callable(match) else match == prompt):
                return out(prompt) if callable(out) else out
        if self.default is None:
            raise GenerationError(f"scripted generator has no output for prompt {prompt[-80:]!r}")
        return self.default(prompt) if callable(self.default) else self.default

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[Generation]:
        self.calls.append(list(prompts))
        if self.delay_s:
            time.sleep(self.delay_s)
        return [self._one(p) for p in prompts]

    def stream(self, prompt: str, params: GenerationParams,
               cancel: threading.Event | None = None) -> Iterator[str]:
        text = self.generate([prompt], params)[0].text
        for i in range(0, len(text), 4):
            if cancel is not None and cancel.is_set():
                return
            if self.stream_delay_s:
                time.sleep(self.stream_delay_s)
            yield text[i : i + 4]


def text_generation(text: str, *, logprob: float = -0.1) -> Generation:
    """A plain scripted completion: one pseudo-token per word, each with ``logprob``."""
    words = text.split() or [""]
    return Generation(text=text, token_ids=list(range(2, 2 + len(words))),
                      token_logprobs=[logprob] * len(words), finish_reason="stop")
