"""`ChatRagPipeline`: the SciPhi chat flow (``get_chat_completion``).

Check the stop token, format the conversation, retrieve for the most recent user turn, append
the context after the final response marker, generate, remove cruft. Streams token by token.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from rag.config import ChatPipelineConfig
from rag.errors import ConfigError
from rag.generation import Generator
from rag.pipeline import BasePipeline, Conversation, citations
from rag.prompts import ChatFormat, check_messages, get_format, last_user_message, remove_cruft
from rag.prompts.sanitize import neutralize
from rag.retriever import Retriever
from rag.types import (
    Answer,
    AnswerEvent,
    ChatMessage,
    DoneEvent,
    Generation,
    GenerationParams,
    Hit,
    SourcesEvent,
    TextEvent,
    Timings,
    TokenLogprob,
    Trace,
    Usage,
)

REWRITE_INSTRUCTION = (
    "Write the ideal search query to find information that answers the user's latest message "
    "in this conversation. Reply with the query only.\n\n{conversation}")
HYDE_INSTRUCTION = (
    "Write a short encyclopedia passage that answers the user's latest message in this "
    "conversation. Reply with the passage only.\n\n{conversation}")


def build_context(hits: Sequence[Hit], max_chars: int, extra_control: Sequence[str] = ()
                  ) -> tuple[str, list[Hit]]:
    """Passages as ``title\\ntext``, newline-joined, cut to ``max_chars``; returns the context
    and the hits that made it in. Passages are neutralised before cutting, so a cut can never
    produce (or leave half of) a control string."""
    parts: list[str] = []
    used: list[Hit] = []
    size = 0
    for h in hits:
        p = h.passage
        block = neutralize(p.title_text, extra_control)
        room = max_chars - size - (1 if parts else 0)
        if room <= 0:
            break
        parts.append(block[:room])
        used.append(h)
        size += len(parts[-1]) + (1 if len(parts) > 1 else 0)
    return "\n".join(parts), used


@dataclass(frozen=True)
class Prepared:
    """One conversation ready to generate: its prompt, the hits in its context, retrieval seconds,
    how many retrieved hits the context budget left out, and the query searched (None: none)."""

    prompt: str
    hits: list[Hit]
    retrieval_s: float
    cut: int
    query: str | None


class StreamCleaner:
    """`remove_cruft` on a growing completion: feed pieces, get the new clean text, holding back
    a trailing ``[...``/``<...`` that may still become a control string."""

    def __init__(self) -> None:
        self.raw, self.emitted = "", ""

    def _emit(self, text: str) -> str:
        if len(text) > len(self.emitted) and text.startswith(self.emitted):
            new, self.emitted = text[len(self.emitted):], text
            return new
        return ""

    def feed(self, piece: str) -> str:
        self.raw += piece
        cut = max(self.raw.rfind("["), self.raw.rfind("<"))
        open_tail = cut >= 0 and not any(c in self.raw[cut:] for c in "]>")
        return self._emit(remove_cruft(self.raw[:cut] if open_tail else self.raw))

    def finish(self) -> str:
        return self._emit(remove_cruft(self.raw))


class ChatRagPipeline(BasePipeline):
    """Conversation -> retrieval for the last user turn -> formatted prompt -> answer."""

    config: ChatPipelineConfig
    generator: Generator

    def __init__(self, config: ChatPipelineConfig, generator: Generator,
                 retriever: Retriever | None = None):
        super().__init__(config, generator, retriever)
        self._format: ChatFormat | None = None

    @property
    def format(self) -> ChatFormat:
        if self._format is None:
            p = self.config.prompt
            kw: dict[str, Any] = {"extra_control": self.generator.control_strings(),
                                  "context_position": p.context_position}
            if p.context_template:
                kw["context_template"] = p.context_template
            if p.format == "sciphi" and p.system_prompt:
                kw["system_prompt"] = p.system_prompt
            self._format = get_format(p.format, generator=self.generator, **kw)
        return self._format

    def validate(self, messages: Conversation) -> None:
        """Roles and order, and a format this generator can render (before any work); the
        prompt itself is rendered once, after retrieval."""
        check_messages(messages)
        _ = self.format

    def _params(self, params: GenerationParams | None) -> GenerationParams:
        """The call's generation settings; the sciphi format refuses any without the
        ``<paragraph>`` stop (as ``get_chat_completion`` does), whatever the entry point."""
        params = params or self.config.generation
        if self.config.prompt.format == "sciphi" and "<paragraph>" not in params.stop:
            raise ConfigError(f"generation stop {params.stop} lacks '<paragraph>', which the sciphi "
                              "format needs (the model stops when it asks for more evidence); add it")
        return params

    async def rewrite(self, messages: Conversation, *, passage: bool = False) -> str:
        """The generator's standalone search query for the conversation (its last user turn when
        there is no earlier turn, or when the model returns nothing), or with ``passage`` the
        generator's short passage answering it (HyDE: searched for passages like it)."""
        question = last_user_message(messages)
        if len(messages) < 2 and not passage:
            return question
        convo = "\n".join(f"{m.role}: {m.content}" for m in messages if m.role != "system")
        instruction = HYDE_INSTRUCTION if passage else REWRITE_INSTRUCTION
        prompt = self.format.render([ChatMessage(role="user", content=instruction.format(conversation=convo))])
        (g,) = await self.generator.agenerate([prompt], GenerationParams(max_new_tokens=96 if passage else 32))
        text = remove_cruft(g.text).strip()
        if not text:
            return question
        return " ".join(text.split()) if passage else text.splitlines()[0].strip()

    async def prepare(self, conversations: Sequence[Conversation], *, top_k: int | None = None,
                      hits: Sequence[Sequence[Hit]] | None = None) -> list[Prepared]:
        """Retrieve for every conversation in one batch by the pipeline's query strategy (or take
        pre-retrieved ``hits``) and render each prompt."""
        k = top_k or self.config.retrieval.top_k
        for convo in conversations:
            self.validate(convo)  # before any retrieval or generation
        t0 = time.perf_counter()
        with_context = self.retriever is not None or hits is not None
        hit_lists: list[list[Hit]] = [[] for _ in conversations]
        queries: list[str | None] = [None] * len(conversations)
        if hits is not None:
            hit_lists = [list(h)[:k] for h in hits]
        elif self.retriever is not None:
            hit_lists, used_queries = await self.conversation_hits(conversations, k)
            queries = list(used_queries)
        t_ret = (time.perf_counter() - t0) / max(1, len(conversations))
        out = []
        for convo, found, query in zip(conversations, hit_lists, queries, strict=True):
            context, used = (build_context(found, self.config.retrieval.context_chars,
                                           self.format.extra_control) if with_context else ("", []))
            out.append(Prepared(self.format.render(convo, context if with_context else None), used, t_ret,
                                len(found) - len(used), query))
        return out

    def _answer(self, p: Prepared, g: Generation, timings: Timings, params: GenerationParams) -> Answer:
        logprobs = None
        if params.want_logprobs:
            tops = g.top_logprobs or [{}] * len(g.token_ids)
            logprobs = [TokenLogprob(id=t, logprob=lp, top=top)
                        for t, lp, top in zip(g.token_ids, g.token_logprobs, tops, strict=False)]
        return Answer(text=remove_cruft(g.text), citations=citations(p.hits), hits=p.hits,
                      usage=Usage(prompt_tokens=g.prompt_tokens, completion_tokens=len(g.token_ids)),
                      timings=timings, finish_reason=g.finish_reason, logprobs=logprobs,
                      trace=Trace(prompt=p.prompt, raw_completion=g.text, query=p.query))

    async def aanswer_batch(self, conversations: Sequence[Conversation], *, top_k: int | None = None,
                            params: GenerationParams | None = None,
                            hits: Sequence[Sequence[Hit]] | None = None) -> list[Answer]:
        """Answer many conversations with one batched generation call."""
        params = self._params(params)
        prepared = await self.prepare(conversations, top_k=top_k, hits=hits)
        t0 = time.perf_counter()
        gens = await self.generator.agenerate([p.prompt for p in prepared], params)
        t_gen = (time.perf_counter() - t0) / max(1, len(prepared))
        return [self._answer(p, g, Timings(retrieval_s=p.retrieval_s, generation_s=t_gen), params)
                for p, g in zip(prepared, gens, strict=True)]

    async def astream(self, messages: Conversation, *, top_k: int | None = None,
                      params: GenerationParams | None = None) -> AsyncIterator[AnswerEvent]:
        """Retrieve, send the sources, then the cleaned text token by token; closing the
        iteration aborts the generation."""
        t0 = time.perf_counter()
        params = self._params(params)
        (p,) = await self.prepare([messages], top_k=top_k)
        yield SourcesEvent(hits=p.hits, cut=p.cut, query=p.query)
        cleaner, raw, first, last = StreamCleaner(), "", None, None
        t1 = time.perf_counter()
        async for chunk in self.generator.stream(p.prompt, params):
            raw += chunk.text
            last = chunk
            new = cleaner.feed(chunk.text)
            if new:
                first = first if first is not None else time.perf_counter() - t0
                yield TextEvent(text=new)
        tail = cleaner.finish()
        if tail:
            yield TextEvent(text=tail)
        assert last is not None and last.finish_reason is not None
        timings = Timings(retrieval_s=p.retrieval_s, generation_s=time.perf_counter() - t1, first_token_s=first)
        yield DoneEvent(answer=Answer(
            text=cleaner.emitted, citations=citations(p.hits), hits=p.hits,
            usage=Usage(prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens),
            timings=timings, finish_reason=last.finish_reason,
            trace=Trace(prompt=p.prompt, raw_completion=raw, query=p.query)))
