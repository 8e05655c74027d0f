"""OpenAI-compatible HTTP service over one pipeline (FastAPI).

Routes: ``POST /v1/chat/completions`` (JSON or SSE streaming), ``GET /v1/models``,
``POST /v1/retrieve``, ``GET /health``, ``GET /metrics`` (Prometheus text).

Concurrent non-streaming requests are collected by a batching queue and answered with one
batched pipeline call per group of equal generation settings; the queue is bounded (429 with
``Retry-After`` when full), each request has a timeout (504), and a request whose client went
away before its batch started is dropped. Errors use the OpenAI error shape. Responses carry an
extension field ``rag`` (citations; Self-RAG scores and retrieval decision); requests may carry
``rag: {"top_k": N, "include_trace": bool}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rag.errors import ConfigError, PromptError, RagError, missing_extra
from rag.types import Answer, ChatMessage, GenerationParams

log = logging.getLogger(__name__)

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.concurrency import iterate_in_threadpool
except ImportError:  # pragma: no cover - depends on the environment
    raise missing_extra("fastapi", "serve") from None


class ServiceLimits(BaseModel):
    """Caps on what one request may ask for, and on the queue."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_queue: int = Field(64, ge=1, description="requests waiting or running before 429")
    max_batch: int = Field(16, ge=1, description="requests per batched pipeline call")
    batch_wait_s: float = Field(0.01, ge=0, description="how long a batch waits to fill")
    timeout_s: float = Field(120.0, gt=0, description="per-request timeout (504)")
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_messages: int = Field(64, ge=1)
    max_message_chars: int = Field(32_000, ge=1)
    max_tokens: int = Field(2048, ge=1)
    max_top_k: int = Field(50, ge=1)


# --- request models -------------------------------------------------------------------------


class RagOptions(BaseModel):
    """Request extension ``rag``."""

    model_config = ConfigDict(extra="forbid")
    top_k: int | None = Field(None, ge=1, description="passages to retrieve")
    include_trace: bool = False


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | None = None


class ChatRequest(BaseModel):
    """The OpenAI chat completion request fields we honour (others are ignored)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[MessageIn]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    rag: RagOptions | None = None


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str = Field(min_length=1, max_length=4096)
    top_k: int = Field(5, ge=1)


class HTTPError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# --- metrics --------------------------------------------------------------------------------


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("rag_requests_total", "HTTP requests", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("rag_request_latency_seconds", "request latency", ["route"],
                                 registry=self.registry)
        self.tokens = Counter("rag_tokens_total", "tokens", ["kind"], registry=self.registry)
        self.retrieval = Histogram("rag_retrieval_seconds", "retrieval time per request",
                                   registry=self.registry)
        self.queue_depth = Gauge("rag_queue_depth", "requests waiting or running", registry=self.registry)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# --- batching queue ---------------------------------------------------------------------------


@dataclass
class _Job:
    messages: list[ChatMessage]
    params: GenerationParams
    top_k: int | None
    future: Future[Answer] = field(default_factory=Future)


class Batcher:
    """Collects concurrent requests and answers them with batched pipeline calls (one thread:
    the generator is used by one batch at a time)."""

    def __init__(self, pipeline: Any, limits: ServiceLimits, metrics: Metrics):
        self.pipeline, self.limits, self.metrics = pipeline, limits, metrics
        self._jobs: list[_Job] = []
        self._cond = threading.Condition()
        self._inflight = 0
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="rag-batcher", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._inflight

    def try_acquire(self) -> bool:
        with self._cond:
            if self._inflight >= self.limits.max_queue:
                return False
            self._inflight += 1
            self.metrics.queue_depth.set(self._inflight)
            return True

    def release(self) -> None:
        with self._cond:
            self._inflight -= 1
            self.metrics.queue_depth.set(self._inflight)

    def submit(self, job: _Job) -> Future[Answer]:
        with self._cond:
            self._jobs.append(job)
            self._cond.notify()
        return job.future

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _take(self) -> list[_Job]:
        with self._cond:
            while not self._jobs and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return []
        time.sleep(self.limits.batch_wait_s)  # let concurrent requests join the batch
        with self._cond:
            batch, self._jobs = self._jobs[: self.limits.max_batch], self._jobs[self.limits.max_batch:]
        return batch

    def _loop(self) -> None:
        while not self._stopped:
            batch = [j for j in self._take() if j.future.set_running_or_notify_cancel()]
            groups: dict[tuple[str, int | None], list[_Job]] = {}
            for job in batch:
                groups.setdefault((job.params.model_dump_json(), job.top_k), []).append(job)
            for (_, top_k), jobs in groups.items():
                try:
                    answers = self.pipeline.chat_batch([j.messages for j in jobs], top_k=top_k,
                                                       params=jobs[0].params)
                except BaseException as e:  # delivered to every waiting request
                    for j in jobs:
                        j.future.set_exception(e)
                    continue
                for j, a in zip(jobs, answers, strict=True):
                    j.future.set_result(a)


# --- the app ----------------------------------------------------------------------------------


def _check_auth(request: Request, api_key: str | None) -> None:
    if not api_key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), api_key.encode()):
        raise HTTPError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                        code="invalid_api_key")


def _params(req: ChatRequest, base: GenerationParams, limits: ServiceLimits) -> GenerationParams:
    if req.n != 1:
        raise HTTPError(400, f"n={req.n} is not supported; only n=1", param="n")
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise HTTPError(400, f"max_tokens={max_tokens} exceeds this server's limit of "
                             f"{limits.max_tokens}", param="max_tokens")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    update: dict[str, Any] = {"stop": list(dict.fromkeys(base.stop + stops))}
    if max_tokens is not None:
        update["max_new_tokens"] = max_tokens
    if req.temperature is not None:
        update["temperature"] = req.temperature
    if req.top_p is not None:
        update["top_p"] = req.top_p
    if req.seed is not None:
        update["seed"] = req.seed
    return base.model_copy(update=update)


def _messages(req: ChatRequest, limits: ServiceLimits) -> list[ChatMessage]:
    if not req.messages:
        raise HTTPError(400, "messages must not be empty", param="messages")
    if len(req.messages) > limits.max_messages:
        raise HTTPError(400, f"{len(req.messages)} messages exceed the limit of {limits.max_messages}",
                        param="messages")
    out = []
    for i, m in enumerate(req.messages):
        if m.role not in ("system", "user", "assistant"):
            raise HTTPError(400, f"messages[{i}].role {m.role!r} is not supported; use system, "
                                 "user or assistant", param=f"messages[{i}].role")
        content = m.content or ""
        if len(content) > limits.max_message_chars:
            raise HTTPError(400, f"messages[{i}].content has {len(content)} characters; the limit "
                                 f"is {limits.max_message_chars}", param=f"messages[{i}].content")
        out.append(ChatMessage(role=m.role, content=content))
    return out


def _rag_extension(answer: Answer, include_trace: bool) -> dict[str, Any]:
    ext: dict[str, Any] = {"citations": [c.model_dump() for c in answer.citations]}
    if answer.scores:
        ext["scores"] = [s.model_dump() for s in answer.scores]
    if answer.retrieval:
        ext["retrieval"] = answer.retrieval
    if include_trace:
        ext["trace"] = answer.trace
    return ext


def create_app(pipeline: Any, *, model_name: str | None = None, api_key: str | None = None,
               limits: ServiceLimits | None = None) -> FastAPI:
    """Build the ASGI app around a loaded pipeline."""
    limits = limits or ServiceLimits()
    model_name = model_name or pipeline.config.name
    metrics = Metrics()
    batcher = Batcher(pipeline, limits, metrics)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        batcher.stop()

    app = FastAPI(title="rag", version="0.1.0", lifespan=lifespan)
    app.state.batcher = batcher

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        t0 = time.perf_counter()
        route = request.url.path
        try:
            if route not in ("/health", "/metrics"):
                _check_auth(request, api_key)
            if request.method == "POST":
                length = request.headers.get("content-length")
                if length is not None and int(length) > limits.max_body_bytes:
                    raise HTTPError(413, f"request body of {length} bytes exceeds "
                                         f"{limits.max_body_bytes}", code="body_too_large")
                body = await request.body()
                if len(body) > limits.max_body_bytes:
                    raise HTTPError(413, f"request body exceeds {limits.max_body_bytes} bytes",
                                    code="body_too_large")
            response = await call_next(request)
        except HTTPError as e:
            response = JSONResponse(error_body(e.message, e.type, e.param, e.code),
                                    status_code=e.status, headers=e.headers)
        metrics.requests.labels(route, str(response.status_code)).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - t0)
        return response

    @app.exception_handler(HTTPError)
    async def _http_error(_: Request, e: HTTPError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status,
                            headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"malformed JSON body: {first.get('msg')}",
                                           "invalid_request_error"), status_code=400)
        msg = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', ()) if x != 'body')}: {er.get('msg')}"
                        for er in errs)
        return JSONResponse(error_body(msg, "invalid_request_error", param), status_code=400)

    @app.exception_handler(RagError)
    async def _rag_error(_: Request, e: RagError) -> JSONResponse:
        if isinstance(e, (PromptError, ConfigError)):
            return JSONResponse(error_body(str(e), "invalid_request_error"), status_code=400)
        return JSONResponse(error_body(str(e), "server_error"), status_code=500)

    @app.get("/health")
    def health() -> dict[str, Any]:
        retriever = getattr(pipeline, "retriever", None)
        store = getattr(retriever, "store", None)
        return {"status": "ok", "model": model_name,
                "generator": getattr(pipeline.generator, "model_name", None),
                "index": str(getattr(retriever, "folder", "")) or None,
                "passages": len(store) if store is not None else 0}

    @app.get("/metrics")
    def prom() -> Response:
        return PlainTextResponse(metrics.render().decode(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "rag"}]}

    @app.post("/v1/retrieve")
    def retrieve(req: RetrieveRequest) -> dict[str, Any]:
        retriever = getattr(pipeline, "retriever", None)
        if retriever is None:
            raise HTTPError(400, "this pipeline has no index; start rag serve with --index")
        if req.top_k > limits.max_top_k:
            raise HTTPError(400, f"top_k={req.top_k} exceeds the limit of {limits.max_top_k}", param="top_k")
        t0 = time.perf_counter()
        hits = retriever.search(req.query, req.top_k)
        metrics.retrieval.observe(time.perf_counter() - t0)
        return {"object": "list", "data": [h.to_json() for h in hits]}

    async def parse(request: Request) -> ChatRequest:
        try:
            raw = json.loads(await request.body())
        except json.JSONDecodeError as e:
            raise HTTPError(400, f"malformed JSON body: {e.msg} at line {e.lineno} column {e.colno}") from None
        try:
            return ChatRequest.model_validate(raw)
        except ValidationError as e:
            er = e.errors()[0]
            loc = ".".join(str(x) for x in er["loc"])
            raise HTTPError(400, f"{loc}: {er['msg']}", param=loc) from None

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        req = await parse(request)
        messages = _messages(req, limits)
        params = _params(req, pipeline.config.generation, limits)
        opts = req.rag or RagOptions()
        if opts.top_k is not None and opts.top_k > limits.max_top_k:
            raise HTTPError(400, f"rag.top_k={opts.top_k} exceeds the limit of {limits.max_top_k}",
                            param="rag.top_k")
        fmt = getattr(pipeline, "format", None)
        if fmt is not None:
            fmt.render(messages)  # role/order errors become 400 before queueing
        if not batcher.try_acquire():
            raise HTTPError(429, "the server is busy; retry later", type="rate_limit_error",
                            code="queue_full", headers={"Retry-After": "1"})
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return StreamingResponse(_stream(request, cid, now, messages, params, opts),
                                     media_type="text/event-stream")
        try:
            job = _Job(messages, params, opts.top_k)
            future = batcher.submit(job)
            try:
                answer = await asyncio.wait_for(asyncio.wrap_future(future), limits.timeout_s)
            except asyncio.TimeoutError:
                future.cancel()
                raise HTTPError(504, f"the request took longer than {limits.timeout_s:g}s",
                                type="server_error", code="timeout") from None
            except asyncio.CancelledError:  # client went away: drop it if not started
                future.cancel()
                raise
        finally:
            batcher.release()
        usage = {"prompt_tokens": answer.usage.get("prompt_tokens", 0),
                 "completion_tokens": answer.usage.get("completion_tokens", 0)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        metrics.tokens.labels("prompt").inc(usage["prompt_tokens"])
        metrics.tokens.labels("completion").inc(usage["completion_tokens"])
        timings = answer.trace.get("timings", {})
        if "retrieval_s" in timings:
            metrics.retrieval.observe(timings["retrieval_s"])
        finish = "length" if answer.trace.get("finish_reason") == "length" else "stop"
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": now, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "finish_reason": finish, "logprobs": None}],
            "usage": usage, "rag": _rag_extension(answer, opts.include_trace)})

    async def _stream(request: Request, cid: str, now: int, messages: Sequence[ChatMessage],
                      params: GenerationParams, opts: RagOptions) -> AsyncIterator[str]:
        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        cancel = threading.Event()
        try:
            yield chunk({"role": "assistant", "content": ""})
            if hasattr(pipeline, "stream"):
                hits, pieces = await asyncio.to_thread(pipeline.stream, messages, top_k=opts.top_k,
                                                       params=params, cancel=cancel)
                async for piece in iterate_in_threadpool(pieces):
                    if await request.is_disconnected():
                        cancel.set()  # stops generation at the next token
                        return
                    yield chunk({"content": piece})
                from rag.pipeline import citations

                ext = {"citations": [c.model_dump() for c in citations(hits)]}
            else:  # Self-RAG: the answer is chosen after all candidates are scored
                answer = (await asyncio.to_thread(pipeline.chat_batch, [messages], top_k=opts.top_k,
                                                  params=params))[0]
                yield chunk({"content": answer.text})
                ext = _rag_extension(answer, opts.include_trace)
            yield chunk({}, "stop", rag=ext)
            yield "data: [DONE]\n\n"
        except RagError as e:
            yield f"data: {json.dumps(error_body(str(e), 'server_error'))}\n\n"
        finally:
            cancel.set()
            batcher.release()

    return app


def serve(pipeline: Any, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: ServiceLimits | None = None) -> None:
    """Run the service with uvicorn (blocking)."""
    try:
        import uvicorn
    except ImportError:
        raise missing_extra("uvicorn", "serve") from None
    app = create_app(pipeline, api_key=api_key, limits=limits)
    uvicorn.run(app, host=host, port=port, log_level="warning")

