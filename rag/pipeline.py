"""Pipelines: retrieval + prompt + generation behind one `Answer` type.

`ChatRagPipeline` is the SciPhi chat flow (``get_chat_completion``): check the stop token,
format the conversation, retrieve for the most recent user turn, append the context after the
final response marker, generate, remove cruft. The same object serves the CLI, the HTTP service
and evaluation runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rag.config import PipelineConfig
from rag.errors import ConfigError
from rag.generation import Generator, load_generator
from rag.prompts import ChatFormat, get_format, last_user_message, remove_cruft
from rag.prompts.sanitize import neutralize, tokenizer_control_strings
from rag.retriever import Retriever, load_retriever
from rag.types import Answer, ChatMessage, Citation, GenerationParams, Hit

log = logging.getLogger(__name__)

REWRITE_INSTRUCTION = (
    "Write the ideal search query to find information that answers the user's latest message "
    "in this conversation. Reply with the query only.\n\n{conversation}")


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
        block = neutralize(f"{p.title}\n{p.text}" if p.title else p.text, extra_control)
        room = max_chars - size - (1 if parts else 0)
        if room <= 0:
            break
        parts.append(block[:room])
        used.append(h)
        size += len(parts[-1]) + (1 if len(parts) > 1 else 0)
    return "\n".join(parts), used


def citations(hits: Sequence[Hit]) -> list[Citation]:
    return [Citation(id=h.passage.id, title=h.passage.title, score=h.score) for h in hits]


class ChatRagPipeline:
    """Conversation -> retrieval for the last user turn -> formatted prompt -> answer."""

    def __init__(self, config: PipelineConfig, generator: Generator,
                 retriever: Retriever | None = None):
        self.config = config
        self.generator = generator
        self.retriever = retriever
        self._format: ChatFormat | None = None

    @property
    def format(self) -> ChatFormat:
        if self._format is None:
            tok = self.generator.tokenizer
            kw: dict[str, Any] = {"extra_control": tokenizer_control_strings(tok),
                                  "context_position": self.config.prompt.context_position}
            if self.config.prompt.context_template:
                kw["context_template"] = self.config.prompt.context_template
            if self.config.prompt.format == "sciphi" and self.config.prompt.system_prompt:
                kw["system_prompt"] = self.config.prompt.system_prompt
            self._format = get_format(self.config.prompt.format, tokenizer=tok, **kw)
        return self._format

    def _params(self, params: GenerationParams | None) -> GenerationParams:
        return params or self.config.generation

    def _query(self, messages: Sequence[ChatMessage]) -> str:
        question = last_user_message(messages)
        if not self.config.query_rewrite or len(messages) < 2:
            return question
        convo = "\n".join(f"{m.role}: {m.content}" for m in messages if m.role != "system")
        prompt = self.format.render([ChatMessage(role="user",
                                                 content=REWRITE_INSTRUCTION.format(conversation=convo))])
        rewritten = self.generator.generate([prompt], GenerationParams(max_new_tokens=32))[0].text
        return remove_cruft(rewritten).splitlines()[0].strip() if rewritten.strip() else question

    def prepare(self, conversations: Sequence[Sequence[ChatMessage]], *, top_k: int | None = None,
                hits: Sequence[Sequence[Hit]] | None = None) -> list[tuple[str, list[Hit], float]]:
        """Retrieve for every conversation in one batch (or take pre-retrieved ``hits``);
        return (prompt, hits used, seconds)."""
        k = top_k or self.config.retrieval.top_k
        for convo in conversations:
            self.format.render(convo)  # validate roles/order before any retrieval or generation
        t0 = time.perf_counter()
        hit_lists: list[list[Hit]] = [[] for _ in conversations]
        if hits is not None:
            hit_lists = [list(h)[:k] for h in hits]
        elif self.retriever is not None:
            hit_lists = self.retriever.search_batch([self._query(c) for c in conversations], k)
        t_ret = (time.perf_counter() - t0) / max(1, len(conversations))
        out = []
        for convo, found in zip(conversations, hit_lists, strict=True):
            with_context = self.retriever is not None or hits is not None
            context, used = (build_context(found, self.config.retrieval.context_chars,
                                           self.format.extra_control) if with_context else ("", []))
            prompt = self.format.render(convo, context if with_context else None)
            out.append((prompt, used, t_ret))
        return out

    def chat_batch(self, conversations: Sequence[Sequence[ChatMessage]], *,
                   top_k: int | None = None, params: GenerationParams | None = None,
                   hits: Sequence[Sequence[Hit]] | None = None) -> list[Answer]:
        """Answer many conversations with one batched generation call."""
        prepared = self.prepare(conversations, top_k=top_k, hits=hits)
        t0 = time.perf_counter()
        gens = self.generator.generate([p for p, _, _ in prepared], self._params(params))
        t_gen = (time.perf_counter() - t0) / max(1, len(prepared))
        return [Answer(text=remove_cruft(g.text), citations=citations(used), hits=used,
                       usage={"prompt_tokens": g.prompt_tokens, "completion_tokens": len(g.token_ids)},
                       trace={"prompt": prompt, "raw_completion": g.text, "finish_reason": g.finish_reason,
                              "timings": {"retrieval_s": round(t_ret, 4), "generation_s": round(t_gen, 4)}})
                for (prompt, used, t_ret), g in zip(prepared, gens, strict=True)]

    def chat(self, messages: Sequence[ChatMessage], **kw: Any) -> Answer:
        return self.chat_batch([messages], **kw)[0]

    def ask(self, question: str, **kw: Any) -> Answer:
        return self.chat([ChatMessage(role="user", content=question)], **kw)

    def stream(self, messages: Sequence[ChatMessage], *, top_k: int | None = None,
               params: GenerationParams | None = None,
               cancel: threading.Event | None = None) -> tuple[list[Hit], Iterator[str]]:
        """Retrieve, then stream the completion's cleaned text pieces; ``cancel`` stops it."""
        ((prompt, used, _),) = self.prepare([messages], top_k=top_k)
        return used, _clean_stream(self.generator.stream(prompt, self._params(params), cancel))


def _clean_stream(pieces: Iterator[str]) -> Iterator[str]:
    """Stream the cleaned text, holding back a trailing ``[...``/``<...`` that may still become
    a control string."""
    buf, emitted = "", ""
    for piece in pieces:
        buf += piece
        cut = max(buf.rfind("["), buf.rfind("<"))
        safe = buf[:cut] if cut >= 0 and not any(c in buf[cut:] for c in "]>") else buf
        text = remove_cruft(safe)
        if len(text) > len(emitted) and text.startswith(emitted):
            yield text[len(emitted):]
            emitted = text
    text = remove_cruft(buf)
    if len(text) > len(emitted) and text.startswith(emitted):
        yield text[len(emitted):]


class RetrievalPipeline:
    """Retrieval only (``kind: retrieval``): answers carry the ranked hits and no text. For
    retrieval evaluation with the same retriever objects the other pipelines use."""

    generator = None

    def __init__(self, config: PipelineConfig, retriever: Retriever):
        self.config, self.retriever = config, retriever

    def chat_batch(self, conversations: Sequence[Sequence[ChatMessage]], *, top_k: int | None = None,
                   hits: Sequence[Sequence[Hit]] | None = None, **_: Any) -> list[Answer]:
        k = top_k or self.config.retrieval.top_k
        t0 = time.perf_counter()
        found = [list(h)[:k] for h in hits] if hits is not None else self.retriever.search_batch(
            [last_user_message(c) for c in conversations], k)
        t = (time.perf_counter() - t0) / max(1, len(conversations))
        return [Answer(text="", hits=h, citations=citations(h), trace={"timings": {"retrieval_s": t}})
                for h in found]


def build_pipeline(config: PipelineConfig, *, index: str | Path | None = None,
                   generator: Generator | None = None, retriever: Retriever | None = None) -> Any:
    """Load the generator and retriever a config names (``index`` overrides the config's)."""
    g = config.generator
    folder = index or config.index
    if config.kind == "retrieval":
        if retriever is None and (folder is None or config.retrieval.mode == "none"):
            raise ConfigError(f"pipeline {config.name!r} is retrieval-only and needs an index (--index)")
        return RetrievalPipeline(config, retriever or load_retriever(
            folder, config.retrieval.mode, device=config.retrieval.device))  # type: ignore[arg-type]
    if generator is None:
        kw: dict[str, Any] = {"dtype": g.dtype}
        if g.backend == "hf":
            kw["batch_size"] = g.batch_size
        elif g.backend == "vllm":
            kw.update(max_model_len=g.max_model_len, gpu_memory_utilization=g.gpu_memory_utilization)
        else:
            raise ConfigError("the scripted backend needs a generator object (tests and demos)")
        generator = load_generator(g.backend, g.model, **kw)
    if retriever is None and folder is not None and config.retrieval.mode != "none":
        retriever = load_retriever(folder, config.retrieval.mode, device=config.retrieval.device)
    if config.kind == "selfrag":
        from rag.selfrag.pipeline import SelfRagPipeline

        return SelfRagPipeline(config, generator, retriever)
    return ChatRagPipeline(config, generator, retriever)
