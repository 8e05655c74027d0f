"""``POST /v1/completions``: the served model itself, no retrieval (lm-evaluation-harness,
another rag front end's ``openai`` backend): one prompt or a list (texts or token ids), ``echo``
with prompt logprobs, and vLLM's extensions for exact logprobs."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from itertools import accumulate
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from rag.generation import Generator, Prompt
from rag.prompts.sanitize import neutralize
from rag.server.errors import HTTPError
from rag.server.protocol import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ServiceLimits,
    UsageOut,
)
from rag.server.sampling import check_stream_options, check_structured, check_text, generation_params
from rag.server.state import State
from rag.types import Generation, GenerationChunk, GenerationParams

router = APIRouter()
MAX_PROMPTS = 64


def _prompts(req: CompletionRequest, generator: Generator, limits: ServiceLimits) -> list[Prompt]:
    prompts: list[Prompt] = req.prompts()
    if not prompts or len(prompts) > MAX_PROMPTS:
        raise HTTPError(400, f"prompt must hold 1 to {MAX_PROMPTS} prompts, got {len(prompts)}", param="prompt")
    out: list[Prompt] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            p = neutralize(check_text(p, f"prompt[{i}]"), generator.control_strings())
        if len(p) > limits.max_message_chars:
            raise HTTPError(400, f"prompt[{i}] has {len(p)} characters or tokens; the limit is "
                                 f"{limits.max_message_chars}", param="prompt")
        out.append(p)
    return out


def _params(req: CompletionRequest, limits: ServiceLimits) -> GenerationParams:
    """Sampling settings; ``echo`` asks for the prompt's logprobs (top ``logprobs`` of them) and
    ``max_tokens: 0`` (echo only) generates one token that is not returned."""
    if req.max_tokens == 0 and not req.echo:
        raise HTTPError(400, "max_tokens must be at least 1 (0 only with echo)", param="max_tokens")
    base = generation_params(req.model_copy(update={"max_tokens": req.max_tokens or 1}),
                             GenerationParams(max_new_tokens=16), limits)
    echo_lp = req.echo and req.logprobs is not None
    return base.model_copy(update={
        "logprob_token_ids": req.logprob_token_ids or [],
        "top_logprobs": 0 if req.logprob_token_ids else min(req.logprobs or 0, 20),
        "prompt_logprobs": req.prompt_logprobs is not None or echo_lp,
        "prompt_top_logprobs": req.logprobs or 0 if echo_lp else 0})


@router.post("/v1/completions", response_model=None)
async def completions(req: CompletionRequest, request: Request, state: State) -> Response:
    served = state.pick(req.model)
    generator = served.pipeline.generator
    if generator is None:
        raise HTTPError(400, f"the pipeline {served.name!r} has no generator (kind: retrieval)", param="model")
    if req.stream and (req.wants_logprobs or req.echo):
        raise HTTPError(400, "logprobs and echo are returned only without stream", param="stream")
    usage = check_stream_options(req)
    prompts, params = _prompts(req, generator, state.limits), _params(req, state.limits)
    check_structured(params, generator, "model")
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": served.name}
    if req.stream:
        if len(prompts) != 1:
            raise HTTPError(400, "stream takes one prompt", param="prompt")
        work = state.admission.admit(generator.stream(prompts[0], params))
        return EventSourceResponse(state.admission.sse(work, request, _Chunks(head, usage)), sep="\n",
                                   ping=15, shutdown_grace_period=2.0)

    async def batch() -> AsyncIterator[list[Generation]]:
        yield await generator.agenerate(prompts, params)

    gens = await state.admission.result(state.admission.admit(batch()), request)
    if gens is None:
        return Response(status_code=499)  # nobody reads it; the generation was aborted
    choices = [_Choice(req, generator, p, g).build(i) for i, (p, g) in enumerate(zip(prompts, gens, strict=True))]
    n = sum(len(c.token_ids) for c in gens) if req.max_tokens else 0
    body = Completion(**head, choices=choices, usage=UsageOut.of(sum(g.prompt_tokens for g in gens), n).model_dump())
    return JSONResponse(body.model_dump())


class _Chunks:
    """A generator's stream as ``text_completion`` chunks (and the usage chunk when asked)."""

    def __init__(self, head: dict[str, Any], include_usage: bool):
        self.head, self.include_usage = head, include_usage

    def __call__(self, chunk: GenerationChunk) -> Iterator[str]:
        choice = CompletionChoice(text=chunk.text, finish_reason=chunk.finish_reason)
        yield json.dumps(Completion(**self.head, choices=[choice]).model_dump(), ensure_ascii=False)
        if chunk.finish_reason is not None and self.include_usage:
            usage = UsageOut.of(chunk.prompt_tokens, chunk.completion_tokens).model_dump()
            yield json.dumps(Completion(**self.head, choices=[], usage=usage).model_dump())


class _Choice:
    """One prompt's choice, in vLLM's shape: with ``echo`` the prompt's text and tokens come
    first (the first prompt token's logprob is null); ``max_tokens: 0`` returns the prompt only."""

    def __init__(self, req: CompletionRequest, generator: Generator, prompt: Prompt, g: Generation):
        self.req, self.generator, self.prompt, self.g = req, generator, prompt, g
        self.gen_ids = g.token_ids if req.max_tokens else []

    def key(self, tid: int) -> str:
        return f"token_id:{tid}" if self.req.return_tokens_as_token_ids else self.generator.decode([tid])

    def build(self, index: int) -> CompletionChoice:
        req, g = self.req, self.g
        text = g.text if req.max_tokens else ""
        prompt_ids = self.generator.prompt_ids(self.prompt) if req.echo or req.prompt_logprobs is not None else []
        if req.echo:
            text = (self.prompt if isinstance(self.prompt, str) else self.generator.decode(prompt_ids)) + text
        choice = CompletionChoice(index=index, text=text, finish_reason=g.finish_reason if req.max_tokens else "length",
                                  logprobs=self.logprobs(prompt_ids))
        if req.return_token_ids:
            choice.token_ids = self.gen_ids  # type: ignore[attr-defined]
        if req.prompt_logprobs is not None:  # vLLM's shape: None, then {id: {logprob}} per prompt token
            choice.prompt_logprobs = [None] + [  # type: ignore[attr-defined]
                {str(t): {"logprob": lp}} for t, lp in zip(prompt_ids[1:], g.prompt_logprobs, strict=True)]
        return choice

    def logprobs(self, prompt_ids: Sequence[int]) -> CompletionLogprobs | None:
        """The OpenAI completions ``logprobs`` object (vLLM's shape: the requested ids, or the
        top k, plus the token itself at each position; keys ``token_id:N`` when asked)."""
        req, g, n = self.req, self.g, len(self.gen_ids)
        if req.logprobs is None and not req.logprob_token_ids:
            return None
        steps = (g.logprobs if req.logprob_token_ids else g.top_logprobs)[:n]
        ids, own = list(self.gen_ids), list[float | None](g.token_logprobs[:n])
        top: list[dict[int, float]] = [*steps, *[{}] * (n - len(steps))]
        if req.echo:
            prompt_top = g.prompt_top_logprobs or [{}] * len(g.prompt_logprobs)
            ids, own, top = [*prompt_ids, *ids], [None, *g.prompt_logprobs, *own], [{}, *prompt_top, *top]
        tokens = [self.key(t) for t in ids]
        top_out = [None if lp is None else {self.key(t): max(v, -9999.0) for t, v in {tid: lp, **step}.items()}
                   for tid, lp, step in zip(ids, own, top, strict=True)]
        offsets = list(accumulate((len(t) for t in tokens[:-1]), initial=0))[: len(tokens)]
        return CompletionLogprobs(tokens=tokens, token_logprobs=[None if x is None else max(x, -9999.0) for x in own],
                                  top_logprobs=top_out, text_offset=offsets)
