"""A scripted generator: outputs and logprobs written by hand, for exact tests and demos.

A script maps a prompt (exact string, or a callable test) to the `Generation` to return.
Unmatched prompts get ``default``. Tokenization is a tiny word-level vocabulary built on the fly
so `rag.selfrag` can look reflection tokens up by string.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from rag.errors import GenerationError
from rag.generation import Prompt, TokenizerOps
from rag.types import Generation, GenerationChunk, GenerationParams


class ScriptedTokenizer:
    """Maps strings to stable ids; special tokens are whole strings."""

    def __init__(self, special_tokens: Sequence[str] = ()):
        self.vocab: dict[str, int] = {"<unk>": 0, "</s>": 1}
        for t in special_tokens:
            self.vocab.setdefault(t, len(self.vocab))
        self.additional_special_tokens = list(special_tokens)
        self.eos_token, self.eos_token_id = "</s>", 1
        self.unk_token, self.unk_token_id = "<unk>", 0
        self.bos_token_id = None
        self.chat_template = None

    def __call__(self, text: str, **_: object) -> dict[str, list[int]]:
        """Whole words (and special tokens) as ids, added to the vocabulary as met."""
        import re

        specials = sorted(self.additional_special_tokens, key=len, reverse=True)
        pattern = "|".join([re.escape(t) for t in specials] + [r"\S+"])
        return {"input_ids": [self.id_of(t) for t in re.findall(pattern, text)]}

    @property
    def all_special_tokens(self) -> list[str]:
        return ["<unk>", "</s>", *self.additional_special_tokens]

    def __len__(self) -> int:
        return len(self.vocab)

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


class ScriptedGenerator(TokenizerOps):
    """Returns scripted `Generation`s; records every prompt it was given in ``calls``.

    ``delay_s`` simulates generation time per call; ``stream_delay_s`` the time per streamed
    piece (four characters). Both sleep on the event loop, so cancellation stops them.
    """

    model_name = "scripted"

    def __init__(self, script: Sequence[tuple[Match, Generation | Callable[[str], Generation]]] = (),
                 default: Generation | Callable[[str], Generation] | None = None,
                 tokenizer: Any = None):
        self.script = list(script)
        self.default = default
        self._tokenizer = tokenizer or ScriptedTokenizer()
        self._tok_lock = threading.Lock()
        self._calls_lock = threading.Lock()
        self.calls: list[list[str]] = []
        self.delay_s = 0.0
        self.stream_delay_s = 0.0

    def load(self) -> ScriptedGenerator:
        return self

    def close(self) -> None:
        pass

    def _tok(self) -> Any:
        return self._tokenizer

    def _one(self, prompt: str) -> Generation:
        for match, out in self.script:
            if (match(prompt) if callable(match) else match == prompt):
                return out(prompt) if callable(out) else out
        if self.default is None:
            raise GenerationError(f"scripted generator has no output for prompt {prompt[-80:]!r}")
        return self.default(prompt) if callable(self.default) else self.default

    async def agenerate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Generation]:
        texts = [p if isinstance(p, str) else self.decode(self.checked_ids(p, params)) for p in prompts]
        with self._calls_lock:
            self.calls.append(texts)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return [_with_requested(self._one(p), params.logprob_token_ids) for p in texts]

    async def stream(self, prompt: Prompt, params: GenerationParams) -> AsyncIterator[GenerationChunk]:
        (g,) = await self.agenerate([prompt], params)
        pieces = [g.text[i: i + 4] for i in range(0, len(g.text), 4)] or [""]
        for n, piece in enumerate(pieces, 1):
            if self.stream_delay_s:
                await asyncio.sleep(self.stream_delay_s)
            last = n == len(pieces)
            yield GenerationChunk(text=piece, completion_tokens=len(g.token_ids) if last else n,
                                  prompt_tokens=g.prompt_tokens,
                                  finish_reason=g.finish_reason if last else None)


def _with_requested(g: Generation, wanted: Sequence[int]) -> Generation:
    """Every requested id at every position, as real backends return them (an id the script
    does not give gets -100, the scoring's "absent")."""
    if not wanted:
        return g
    steps = list(g.logprobs) + [{}] * (len(g.token_ids) - len(g.logprobs))
    return g.model_copy(update={"logprobs": [{i: step.get(i, -100.0) for i in wanted} for step in steps]})


def text_generation(text: str, *, logprob: float = -0.1) -> Generation:
    """A plain scripted completion: one pseudo-token per word, each with ``logprob``."""
    words = text.split() or [""]
    return Generation(text=text, token_ids=list(range(2, 2 + len(words))),
                      token_logprobs=[logprob] * len(words), finish_reason="stop")
