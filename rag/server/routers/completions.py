"""``POST /v1/completions``: the served model itself, no retrieval (another rag front end's
``openai`` backend), with vLLM's extensions for exact logprobs."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
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
from rag.server.sampling import generation_params
from rag.server.state import State
from rag.types import Generation, GenerationChunk, GenerationParams

router = APIRouter()


def _prompt(req: CompletionRequest, generator: Generator, limits: ServiceLimits) -> Prompt:
    if not isinstance(req.prompt, str):
        return req.prompt
    prompt = neutralize(req.prompt, generator.control_strings())
    if len(prompt) > limits.max_message_chars:
        raise HTTPError(400, f"prompt has {len(prompt)} characters; the limit is {limits.max_message_chars}",
                        param="prompt")
    return prompt


def _params(req: CompletionRequest, limits: ServiceLimits) -> GenerationParams:
    return generation_params(req, GenerationParams(max_new_tokens=16), limits).model_copy(update={
        "stop_token_ids": req.stop_token_ids or [], "logprob_token_ids": req.logprob_token_ids or [],
        "top_logprobs": 0 if req.logprob_token_ids else min(req.logprobs or 0, 20),
        "prompt_logprobs": req.prompt_logprobs is not None})


@router.post("/v1/completions", response_model=None)
async def completions(req: CompletionRequest, request: Request, state: State) -> Response:
    generator = state.pipeline.generator
    if generator is None:
        raise HTTPError(400, "this pipeline has no generator (kind: retrieval)")
    if req.echo:
        raise HTTPError(400, "echo is not supported", param="echo")
    if req.stream and req.wants_logprobs:
        raise HTTPError(400, "logprobs are returned only without stream", param="logprobs")
    prompt, params = _prompt(req, generator, state.limits), _params(req, state.limits)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}
    if req.stream:
        work = state.admission.admit(generator.stream(prompt, params))
        usage = bool((req.stream_options or {}).get("include_usage"))
        return EventSourceResponse(state.admission.sse(work, request, _Chunks(head, usage)), sep="\n",
                                   ping=15, shutdown_grace_period=2.0)

    async def one() -> AsyncIterator[Generation]:
        yield (await generator.agenerate([prompt], params))[0]

    g = await state.admission.result(state.admission.admit(one()), request)
    if g is None:
        return Response(status_code=499)
    n = len(g.token_ids)
    body = Completion(**head, choices=[_choice(g, prompt, generator, req)],
                      usage=UsageOut.of(g.prompt_tokens, n).model_dump())
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


def _choice(g: Generation, prompt: Prompt, generator: Generator, req: CompletionRequest) -> CompletionChoice:
    choice = CompletionChoice(text=g.text, finish_reason=g.finish_reason, logprobs=_logprobs(g, generator, req))
    if req.return_token_ids:
        choice.token_ids = g.token_ids  # type: ignore[attr-defined]
    if req.prompt_logprobs is not None:  # vLLM's shape: None, then {id: {logprob}} per prompt token
        ids = generator.prompt_ids(prompt)
        choice.prompt_logprobs = [None] + [  # type: ignore[attr-defined]
            {str(t): {"logprob": lp}} for t, lp in zip(ids[1:], g.prompt_logprobs, strict=True)]
    return choice


def _logprobs(g: Generation, generator: Generator, req: CompletionRequest) -> CompletionLogprobs | None:
    """The OpenAI completions ``logprobs`` object (vLLM's shape: the requested ids, or the top
    k, plus the sampled token at each position; keys ``token_id:N`` when asked)."""
    if req.logprobs is None and not req.logprob_token_ids:
        return None

    def key(tid: int) -> str:
        return f"token_id:{tid}" if req.return_tokens_as_token_ids else generator.decode([tid])

    steps = g.logprobs if req.logprob_token_ids else g.top_logprobs
    top = []
    for i, (tid, lp) in enumerate(zip(g.token_ids, g.token_logprobs, strict=False)):
        step = {tid: lp, **(steps[i] if i < len(steps) else {})}
        top.append({key(t): max(v, -9999.0) for t, v in step.items()})
    tokens = [key(t) for t in g.token_ids]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return CompletionLogprobs(tokens=tokens, token_logprobs=[max(x, -9999.0) for x in g.token_logprobs],
                              top_logprobs=top, text_offset=offsets)
