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
    ChatLogprobs,
    ChatRequest,
    ChunkChoice,
    RagExtension,
    RagOptions,
    UsageOut,
)
from rag.server.sampling import (
    chat_messages,
    check_stream_options,
    check_structured,
    check_top_k,
    generation_params,
    refuse_unsupported,
)
from rag.server.state import Served, ServerState, State
from rag.types import Answer, AnswerEvent, ChatMessage, DoneEvent, GenerationParams, SourcesEvent, TextEvent

router = APIRouter()


def _usage(answer: Answer) -> UsageOut:
    return UsageOut.of(answer.usage.prompt_tokens, answer.usage.completion_tokens)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(req: ChatRequest, request: Request, state: State) -> Response:
    served = state.pick(req.model)
    messages = chat_messages(req.messages, state.limits)
    params = _params(req, served, state)
    opts = req.rag or RagOptions()
    check_top_k(opts.top_k, state.limits, "rag.top_k")
    usage = check_stream_options(req)
    served.pipeline.validate(messages)  # role/order errors become 400 before admission
    events = (_answered(served, messages, opts, params) if params is not None and params.want_logprobs
              else served.pipeline.astream(messages, top_k=opts.top_k, params=params))
    work = state.admission.admit(events)
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
    logprobs = None
    if answer.logprobs is not None and served.pipeline.generator is not None:
        logprobs = ChatLogprobs.of(answer.logprobs, served.pipeline.generator.decode, req.top_logprobs or 0)
    body = ChatCompletion(id=chunks.cid, created=chunks.now, model=served.name, usage=_usage(answer),
                          rag=RagExtension.of(answer, opts),
                          choices=[ChatChoice(message=AssistantMessage(content=answer.text),
                                              finish_reason=answer.finish_reason, logprobs=logprobs)])
    return JSONResponse(body.model_dump())


def _params(req: ChatRequest, served: Served, state: ServerState) -> GenerationParams | None:
    """The request's generation settings (None: a retrieval pipeline), with the logprobs it asks
    for; 400 for what the pipeline cannot honour."""
    if served.generation is None:
        refuse_unsupported(req)
        return None
    params = generation_params(req, served.generation, state.limits)
    kind = served.kind
    check_structured(params, served.pipeline.generator, kind)
    if req.top_logprobs is not None and not req.logprobs:
        raise HTTPError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if not req.logprobs:
        return params
    if req.stream:
        raise HTTPError(400, "logprobs are returned only without stream", param="logprobs", code="unsupported_field")
    if kind != "chat":
        raise HTTPError(400, f"logprobs are returned by chat pipelines only, not by a {kind} pipeline",
                        param="logprobs", code="unsupported_field")
    return params.model_copy(update={"want_logprobs": True, "top_logprobs": req.top_logprobs or 0})


async def _answered(served: Served, messages: list[ChatMessage], opts: RagOptions,
                    params: GenerationParams) -> AsyncIterator[AnswerEvent]:
    """The answer in one piece (the batch path, which returns logprobs)."""
    (answer,) = await served.pipeline.aanswer_batch([messages], top_k=opts.top_k, params=params)
    yield DoneEvent(answer=answer)


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
            if event.cut:
                sources["cut"] = event.cut
            if event.query is not None:
                sources["query"] = event.query
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
