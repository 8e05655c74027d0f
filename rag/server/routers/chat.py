"""``POST /v1/chat/completions``: the pipeline's answer, as JSON or server-sent events."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from rag.server.admission import Work
from rag.server.errors import HTTPError
from rag.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    ChunkChoice,
    RagExtension,
    RagOptions,
    SamplingRequest,
    UsageOut,
)
from rag.server.sampling import (
    chat_messages,
    check_structured,
    check_top_k,
    generation_params,
    refuse_unsupported,
)
from rag.server.state import ServerState, State
from rag.types import Answer, AnswerEvent, DoneEvent, SourcesEvent, TextEvent

router = APIRouter()


def _usage(answer: Answer) -> UsageOut:
    return UsageOut.of(answer.usage.prompt_tokens, answer.usage.completion_tokens)


def check_stream_options(req: SamplingRequest) -> bool:
    """Whether a stream ends with a usage chunk (``stream_options.include_usage``); 400 for
    ``stream_options`` without ``stream``, as OpenAI answers."""
    if req.stream_options is None:
        return False
    if not req.stream:
        raise HTTPError(400, "stream_options is only allowed when stream is true", param="stream_options")
    return req.stream_options.include_usage


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(req: ChatRequest, request: Request, state: State) -> Response:
    served = state.pick(req.model)
    if req.logprobs or req.top_logprobs:
        raise HTTPError(400, "logprobs are not returned on chat completions here (the answer is cleaned "
                             "after generation); use /v1/completions with logprobs", param="logprobs",
                        code="unsupported_field")
    messages = chat_messages(req.messages, state.limits)
    params = generation_params(req, served.generation, state.limits) if served.generation is not None else None
    if params is None:
        refuse_unsupported(req)
    else:
        check_structured(params, served.pipeline.generator, served.pipeline.info().kind)
    opts = req.rag or RagOptions()
    check_top_k(opts.top_k, state.limits, "rag.top_k")
    usage = check_stream_options(req)
    served.pipeline.validate(messages)  # role/order errors become 400 before admission
    work = state.admission.admit(served.pipeline.astream(messages, top_k=opts.top_k, params=params))
    chunks = _Chunks(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), served.name, opts, state, usage)
    if req.stream:
        return EventSourceResponse(_stream(state, work, request, chunks), sep="\n", ping=15,
                                   shutdown_grace_period=2.0)
    done = await state.admission.result(work, request)
    if done is None:
        return Response(status_code=499)  # nobody reads it; the generation was aborted
    assert isinstance(done, DoneEvent)
    answer = done.answer
    state.metrics.observe(answer)
    body = ChatCompletion(id=chunks.cid, created=chunks.now, model=served.name, usage=_usage(answer),
                          rag=RagExtension.of(answer, opts),
                          choices=[ChatChoice(message=AssistantMessage(content=answer.text),
                                              finish_reason=answer.finish_reason)])
    return JSONResponse(body.model_dump())


class _Chunks:
    """A stream's events as ``chat.completion.chunk`` data: text deltas, a sources chunk when
    asked, the finish chunk (with the ``rag`` extension), then the usage chunk (``choices: []``)
    when ``stream_options.include_usage`` asked for it."""

    def __init__(self, cid: str, now: int, model: str, opts: RagOptions, state: ServerState, usage: bool):
        self.cid, self.now, self.model, self.opts, self.state, self.usage = cid, now, model, opts, state, usage

    def chunk(self, delta: dict[str, str] | None, finish: str | None = None, **extra: Any) -> str:
        choices = [] if delta is None else [ChunkChoice(delta=delta, finish_reason=finish)]
        body = ChatCompletionChunk(id=self.cid, created=self.now, model=self.model, choices=choices, **extra)
        return json.dumps(body.model_dump(), ensure_ascii=False)

    def __call__(self, event: AnswerEvent) -> Iterator[str]:
        if isinstance(event, TextEvent):
            yield self.chunk({"content": event.text})
        elif isinstance(event, SourcesEvent) and self.opts.include_sources:
            sources: dict[str, Any] = {"sources": [h.to_json() for h in event.hits]}
            if event.retrieval is not None:
                sources["retrieval"] = event.retrieval.model_dump()
            yield self.chunk({}, rag=sources)
        elif isinstance(event, DoneEvent):
            answer = event.answer
            self.state.metrics.observe(answer)
            yield self.chunk({}, answer.finish_reason, rag=RagExtension.of(answer, self.opts).model_dump())
            if self.usage:
                yield self.chunk(None, usage=_usage(answer).model_dump())


async def _stream(state: ServerState, work: Work[AnswerEvent], request: Request, chunks: _Chunks) -> AsyncIterator[str]:
    yield chunks.chunk({"role": "assistant", "content": ""})
    async for data in state.admission.sse(work, request, chunks):
        yield data
