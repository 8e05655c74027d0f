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
from rag.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    ChunkChoice,
    RagExtension,
    RagOptions,
    UsageOut,
)
from rag.server.sampling import chat_messages, check_top_k, generation_params
from rag.server.state import ServerState, State
from rag.types import Answer, AnswerEvent, DoneEvent, SourcesEvent, TextEvent

router = APIRouter()


def _usage(answer: Answer) -> UsageOut:
    return UsageOut.of(answer.usage.prompt_tokens, answer.usage.completion_tokens)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(req: ChatRequest, request: Request, state: State) -> Response:
    messages = chat_messages(req, state.limits)
    base = state.generation
    params = generation_params(req, base, state.limits) if base is not None else None
    opts = req.rag or RagOptions()
    check_top_k(opts.top_k, state.limits, "rag.top_k")
    state.pipeline.validate(messages)  # role/order errors become 400 before admission
    work = state.admission.admit(state.pipeline.astream(messages, top_k=opts.top_k, params=params))
    cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        return EventSourceResponse(_stream(state, work, request, _Chunks(cid, now, state, opts)), sep="\n",
                                   ping=15, shutdown_grace_period=2.0)
    done = await state.admission.result(work, request)
    if done is None:
        return Response(status_code=499)  # nobody reads it; the generation was aborted
    assert isinstance(done, DoneEvent)
    answer = done.answer
    state.metrics.observe(answer)
    body = ChatCompletion(id=cid, created=now, model=state.model_name, usage=_usage(answer),
                          rag=RagExtension.of(answer, opts),
                          choices=[ChatChoice(message=AssistantMessage(content=answer.text),
                                              finish_reason=answer.finish_reason)])
    return JSONResponse(body.model_dump())


class _Chunks:
    """A stream's events as ``chat.completion.chunk`` data."""

    def __init__(self, cid: str, now: int, state: ServerState, opts: RagOptions):
        self.cid, self.now, self.state, self.opts = cid, now, state, opts

    def chunk(self, delta: dict[str, str], finish: str | None = None, **extra: Any) -> str:
        body = ChatCompletionChunk(id=self.cid, created=self.now, model=self.state.model_name,
                                   choices=[ChunkChoice(delta=delta, finish_reason=finish)], **extra)
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
            yield self.chunk({}, answer.finish_reason, usage=_usage(answer).model_dump(),
                             rag=RagExtension.of(answer, self.opts).model_dump())


async def _stream(state: ServerState, work: Work[AnswerEvent], request: Request, chunks: _Chunks) -> AsyncIterator[str]:
    yield chunks.chunk({"role": "assistant", "content": ""})
    async for data in state.admission.sse(work, request, chunks):
        yield data
