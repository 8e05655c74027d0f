"""OpenAI-compatible HTTP service over one pipeline (FastAPI).

Routes: ``POST /v1/chat/completions`` (JSON or SSE streaming), ``GET /v1/models``,
``POST /v1/retrieve`` (the pipeline's mode, or ``mode``: dense / bm25 / hybrid over its index),
``GET /v1/info`` (what the playground needs to know), ``GET /v1/runs`` and
``GET /v1/runs/{run}/{file}`` (eval reports under ``runs_dir``), ``GET /health``, ``GET /metrics``
(Prometheus text), and the playground page ``GET /`` (static files in ``rag/static``).

Generation runs on the pipeline's engine (vLLM's async engine batches concurrent requests
continuously; the transformers backend batches them on its worker). Streaming and non-streaming
requests share one admission bound (``max_inflight``; past it 429 with ``Retry-After``) and one
per-request timeout (504 for JSON; an error event, then ``[DONE]``, for SSE). A client that goes
away aborts its generation; so does a server shutdown (503 / an error event). Errors use the
OpenAI error shape. Responses carry an extension field ``rag`` (citations; Self-RAG scores, the
chosen candidate and the retrieval decision); requests may carry ``rag: {"top_k": N,
"include_trace": bool, "include_sources": bool}`` (sources: the retrieved passages with their
text, also sent in a chunk of their own as soon as they are known when streaming). Message
``content`` may be a string or a list of text parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rag.errors import ConfigError, GenerationError, IndexError_, PromptError, RagError, missing_extra
from rag.prompts.sanitize import neutralize
from rag.types import (
    Answer,
    ChatMessage,
    DoneEvent,
    Generation,
    GenerationParams,
    SourcesEvent,
    TextEvent,
)

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
    from sse_starlette import EventSourceResponse
except ImportError:  # pragma: no cover - depends on the environment
    raise missing_extra("fastapi and sse-starlette", "serve") from None


class ServiceLimits(BaseModel):
    """Caps on what one request may ask for, and on the queue."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_inflight: int = Field(64, ge=1, description="requests being answered before 429 (streams too)")
    timeout_s: float = Field(120.0, gt=0, description="per-request timeout (504 / SSE error event)")
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
    include_sources: bool = False


class ContentPart(BaseModel):
    """One part of a list ``content``; only ``type: text`` is accepted."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None


class _SamplingRequest(BaseModel):
    """The sampling fields both completion routes honour (other fields are ignored)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    min_tokens: int | None = Field(None, ge=0, description="vLLM's extension: generate at least N tokens")


class ChatRequest(_SamplingRequest):
    """The OpenAI chat completion request."""

    messages: list[MessageIn]
    max_completion_tokens: int | None = Field(None, ge=1)
    rag: RagOptions | None = None


class CompletionRequest(_SamplingRequest):
    """``/v1/completions`` on the served model: one prompt, text or token ids, with vLLM's
    extensions for exact logprobs (what the remote backend sends)."""

    prompt: str | list[int] = Field(description="one prompt: text (tokenized by the server) or token ids")
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    stop_token_ids: list[int] | None = None
    logprob_token_ids: list[int] | None = Field(None, max_length=64)
    return_tokens_as_token_ids: bool = False
    return_token_ids: bool = False
    prompt_logprobs: int | None = Field(None, ge=0, le=0, description="0: each prompt token's own logprob")
    stream_options: dict[str, Any] | None = None


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str = Field(min_length=1, max_length=4096)
    top_k: int = Field(5, ge=1)
    mode: Literal["dense", "bm25", "hybrid"] | None = Field(None, description="default: the pipeline's")


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
        self.queue_depth = Gauge("rag_queue_depth", "requests being answered (streaming or not)",
                                 registry=self.registry)
        self.ttft = Histogram("rag_time_to_first_token_seconds", "request start to first text",
                              buckets=(.025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60),
                              registry=self.registry)
        self.tokens_per_s = Histogram("rag_output_tokens_per_second", "completion tokens / generation time",
                                      buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
                                      registry=self.registry)

    def observe(self, answer: Answer) -> None:
        u, t = answer.usage, answer.timings
        self.tokens.labels("prompt").inc(u.prompt_tokens)
        self.tokens.labels("completion").inc(u.completion_tokens)
        self.retrieval.observe(t.retrieval_s)
        if t.first_token_s is not None:
            self.ttft.observe(t.first_token_s)
        if u.completion_tokens and t.generation_s > 0:
            self.tokens_per_s.observe(u.completion_tokens / t.generation_s)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# --- in-flight requests -----------------------------------------------------------------------


class ShuttingDown(Exception):
    """Raised into in-flight requests when the server stops."""


_END = object()  # a work's events are over


class _Work:
    """One request's event stream (a pipeline's answer events, or a generator's output), run as
    its own task; events reach the response through a queue, so the response can stop waiting
    (timeout, disconnect, shutdown) and cancel the work. Cancelling the task cancels the stream,
    which aborts its generation."""

    def __init__(self, events: AsyncIterator[Any]):
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.task = asyncio.create_task(self._pump(events))

    async def _pump(self, events: AsyncIterator[Any]) -> None:
        try:
            async for event in events:
                self.queue.put_nowait(event)
            self.queue.put_nowait(_END)
        except Exception as e:  # delivered to the response; CancelledError ends the task
            self.queue.put_nowait(e)

    def abort(self, reason: BaseException) -> None:
        self.task.cancel()
        self.queue.put_nowait(reason)


class Inflight:
    """The bound on requests being answered (streaming or not) and their handles, so that a
    shutdown can abort them. Used only on the event loop's thread: no lock needed."""

    def __init__(self, limit: int, metrics: Metrics):
        self.limit, self.metrics = limit, metrics
        self.running: set[_Work] = set()
        self.closing = False

    def admit(self, events: AsyncIterator[Any]) -> _Work:
        if self.closing:
            raise HTTPError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if len(self.running) >= self.limit:
            raise HTTPError(429, "the server is busy; retry later", type="rate_limit_error",
                            code="queue_full", headers={"Retry-After": "1"})
        work = _Work(events)
        self.running.add(work)
        self.metrics.queue_depth.set(len(self.running))
        return work

    def done(self, work: _Work) -> None:
        work.task.cancel()
        self.running.discard(work)
        self.metrics.queue_depth.set(len(self.running))

    def abort_all(self) -> None:
        self.closing = True
        for work in list(self.running):
            work.abort(ShuttingDown("the server is shutting down"))


class _Timeout(Exception):
    pass


class _Disconnected(Exception):
    pass


async def _events(work: _Work, request: Request, timeout_s: float) -> AsyncIterator[Any]:
    """The work's events until its last; raises `_Timeout` past the deadline, `_Disconnected`
    when the client went away (checked whenever no event came for half a second)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise _Timeout
        try:
            item = await asyncio.wait_for(work.queue.get(), min(remaining, 0.5))
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise _Disconnected from None
            continue
        if item is _END:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


# --- the app ----------------------------------------------------------------------------------


def _check_auth(request: Request, api_key: str | None) -> None:
    if not api_key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), api_key.encode()):
        raise HTTPError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                        code="invalid_api_key")


def _params(req: _SamplingRequest, base: GenerationParams, limits: ServiceLimits) -> GenerationParams:
    if req.n != 1:
        raise HTTPError(400, f"n={req.n} is not supported; only n=1", param="n")
    max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
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
    if req.min_tokens is not None:
        update["min_new_tokens"] = min(req.min_tokens, update.get("max_new_tokens", base.max_new_tokens))
    return base.model_copy(update=update)


def _content(i: int, content: str | list[ContentPart] | None) -> str:
    """A message's text: a string, or the text parts of a list joined by newlines."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        if part.type != "text":
            raise HTTPError(400, f"messages[{i}].content[{j}] has type {part.type!r}; this server "
                                 "accepts text only (type 'text')", param=f"messages[{i}].content[{j}].type")
        if part.text is None:
            raise HTTPError(400, f"messages[{i}].content[{j}] has no 'text'",
                            param=f"messages[{i}].content[{j}].text")
        texts.append(part.text)
    return "\n".join(texts)


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
        content = _content(i, m.content)
        if len(content) > limits.max_message_chars:
            raise HTTPError(400, f"messages[{i}].content has {len(content)} characters; the limit "
                                 f"is {limits.max_message_chars}", param=f"messages[{i}].content")
        out.append(ChatMessage(role=m.role, content=content))
    return out


def _completion_logprobs(g: Generation, generator: Any, req: CompletionRequest) -> dict[str, Any] | None:
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
    return {"tokens": tokens, "token_logprobs": [max(x, -9999.0) for x in g.token_logprobs],
            "top_logprobs": top, "text_offset": offsets}


def _rag_extension(answer: Answer, opts: RagOptions) -> dict[str, Any]:
    ext: dict[str, Any] = {"citations": [c.model_dump() for c in answer.citations]}
    if answer.scores:
        ext["scores"] = [s.model_dump() for s in answer.scores]
        ext["chosen"] = answer.trace.best_candidate
    if answer.retrieval is not None:
        ext["retrieval"] = answer.retrieval.model_dump()
    if opts.include_sources:
        ext["sources"] = [h.to_json() for h in answer.hits]
    if opts.include_trace:
        ext["timings"] = answer.timings.model_dump()
        ext["trace"] = answer.trace.model_dump(exclude_defaults=True)
    return ext


def _usage(answer: Answer) -> dict[str, int]:
    u = answer.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens}


def _status(e: RagError) -> tuple[int, str]:
    if isinstance(e, (PromptError, ConfigError)):
        return 400, "invalid_request_error"
    if isinstance(e, IndexError_):
        return 503, "server_error"
    if isinstance(e, GenerationError):
        return 502, "server_error"
    return 500, "server_error"


STATIC = Path(__file__).parent / "static"
#: The playground loads nothing from elsewhere and runs no inline script; report images are blobs.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; object-src 'none'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
RUN_FILE_SUFFIXES = (".md", ".png")


def find_runs(root: Path) -> dict[str, Path]:
    """Eval run folders under ``root``: those holding a ``report.md``, up to two levels down,
    by their path relative to ``root`` (``.`` for ``root`` itself)."""
    runs = {}
    for pattern in ("report.md", "*/report.md", "*/*/report.md"):
        for report in sorted(root.glob(pattern)):
            if report.is_file() and not report.is_symlink():
                runs[report.parent.relative_to(root).as_posix()] = report.parent
    return runs


def run_files(folder: Path) -> list[str]:
    """The files of a run folder that the service hands out: the report and its plots."""
    return sorted(f.name for f in folder.iterdir()
                  if f.suffix in RUN_FILE_SUFFIXES and f.is_file() and not f.is_symlink())


def create_app(pipeline: Any, *, model_name: str | None = None, api_key: str | None = None,
               limits: ServiceLimits | None = None, runs_dir: Path | None = None) -> FastAPI:
    """Build the ASGI app around a loaded `rag.pipeline.Pipeline`. ``app.state.inflight``
    aborts every in-flight request (`Inflight.abort_all`); `serve` calls it on SIGTERM/SIGINT.
    ``runs_dir``: the folder whose eval reports the playground may open (none when unset)."""
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    limits = limits or ServiceLimits()
    model_name = model_name or pipeline.config.name
    metrics = Metrics()
    inflight = Inflight(limits.max_inflight, metrics)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        inflight.abort_all()

    app = FastAPI(title="rag", version="0.1.0", lifespan=lifespan)
    app.state.inflight = inflight
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    public = ("/health", "/metrics", "/", "/favicon.ico")  # the page holds nothing secret

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        t0 = time.perf_counter()
        route = request.url.path
        try:
            if route not in public and not route.startswith("/static/"):
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
        response.headers.update(SECURITY_HEADERS)
        if route.startswith("/static/"):
            route = "/static"  # one metrics label, whatever the file
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
        status, kind = _status(e)
        return JSONResponse(error_body(str(e), kind), status_code=status)

    def index_info() -> dict[str, Any]:
        """The index folder and the version served (a following retriever checks for a newer one)."""
        retriever = pipeline.retriever
        refresh, describe = getattr(retriever, "refresh", None), getattr(retriever, "describe", None)
        if refresh is not None:
            refresh()
        if describe is not None:
            return {k: v for k, v in describe().items() if k in ("index", "version", "passages")}
        store = getattr(retriever, "store", None)
        return {"index": None, "version": None, "passages": len(store) if store is not None else 0}

    @app.get("/health")
    def health() -> dict[str, Any]:
        generator = pipeline.generator
        return {"status": "ok", "model": model_name,
                "generator": generator.model_name if generator is not None else None,
                **index_info(), "inflight": len(inflight.running)}

    @app.get("/metrics")
    def prom() -> Response:
        return PlainTextResponse(metrics.render().decode(), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/v1/info")
    def info() -> dict[str, Any]:
        retriever = pipeline.retriever
        own = pipeline.config.retrieval.mode if retriever is not None else None
        has_folder = retriever is not None and (getattr(retriever, "folder", None) is not None
                                                or getattr(retriever, "dense", None) is not None)
        return {"model": model_name, "kind": pipeline.config.kind, "retrieval_mode": own,
                "search_modes": ["dense", "bm25", "hybrid"] if has_folder else ([own] if own else []),
                "top_k": pipeline.config.retrieval.top_k, "index": index_info() if retriever is not None else None,
                "max_tokens": pipeline.config.generation.max_new_tokens if pipeline.generator else None,
                "runs": runs_dir is not None}

    def runs() -> dict[str, Path]:
        if runs_dir is None:
            raise HTTPError(404, "this server shows no eval runs; start rag serve with --runs DIR",
                            code="no_runs")
        return find_runs(runs_dir)

    @app.get("/v1/runs")
    def list_runs() -> dict[str, Any]:
        data = []
        for name, folder in runs().items():
            report = folder / "report.md"
            title = report.read_text(encoding="utf-8", errors="replace").partition("\n")[0].lstrip("# ")
            data.append({"name": name, "title": title, "modified": int(report.stat().st_mtime),
                         "files": run_files(folder)})
        return {"object": "list", "data": data}

    @app.get("/v1/runs/file")
    def run_file(run: str, name: str) -> FileResponse:
        """One file of a listed run; both names must be in the listing (no client paths)."""
        folder = runs().get(run)
        if folder is None:
            raise HTTPError(404, f"no run named {run!r}; GET /v1/runs lists them", param="run")
        if name not in run_files(folder):
            raise HTTPError(404, f"run {run!r} has no file {name!r}; GET /v1/runs lists its files",
                            param="name")
        media = "text/markdown; charset=utf-8" if name.endswith(".md") else "image/png"
        return FileResponse(folder / name, media_type=media)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "rag"}]}

    @app.post("/v1/retrieve")
    async def retrieve(req: RetrieveRequest) -> dict[str, Any]:
        if pipeline.retriever is None:
            raise HTTPError(400, "this pipeline has no index; start rag serve with --index")
        if req.top_k > limits.max_top_k:
            raise HTTPError(400, f"top_k={req.top_k} exceeds the limit of {limits.max_top_k}", param="top_k")
        t0 = time.perf_counter()
        hits = await asyncio.to_thread(pipeline.search, req.query, req.top_k, mode=req.mode)
        metrics.retrieval.observe(time.perf_counter() - t0)
        return {"object": "list", "data": [h.to_json() for h in hits]}

    async def parse(request: Request, model: type[M]) -> M:
        try:
            raw = json.loads(await request.body())
        except json.JSONDecodeError as e:
            raise HTTPError(400, f"malformed JSON body: {e.msg} at line {e.lineno} column {e.colno}") from None
        try:
            return model.model_validate(raw)
        except ValidationError as e:
            er = e.errors()[0]
            loc = ".".join(str(x) for x in er["loc"])
            raise HTTPError(400, f"{loc}: {er['msg']}", param=loc) from None

    async def last_event(work: _Work, request: Request) -> Any:
        """A JSON request's final event (its work done); None when the client went away."""
        last = None
        try:
            async for last in _events(work, request, limits.timeout_s):  # noqa: B007
                pass
        except _Timeout:
            raise HTTPError(504, f"the request took longer than {limits.timeout_s:g}s",
                            type="server_error", code="timeout") from None
        except _Disconnected:
            return None
        except ShuttingDown as e:
            raise HTTPError(503, str(e), type="server_error", code="shutting_down") from None
        finally:
            inflight.done(work)
        return last

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        """The served model itself, no retrieval: another rag front end's `openai` backend."""
        req = await parse(request, CompletionRequest)
        generator = pipeline.generator
        if generator is None:
            raise HTTPError(400, "this pipeline has no generator (kind: retrieval)")
        if req.echo:
            raise HTTPError(400, "echo is not supported", param="echo")
        if req.stream and (req.logprobs is not None or req.logprob_token_ids or req.prompt_logprobs is not None):
            raise HTTPError(400, "logprobs are returned only without stream", param="logprobs")
        if isinstance(req.prompt, str):
            prompt: str | list[int] = neutralize(req.prompt, generator.control_strings())
            if len(prompt) > limits.max_message_chars:
                raise HTTPError(400, f"prompt has {len(prompt)} characters; the limit is "
                                     f"{limits.max_message_chars}", param="prompt")
        else:
            prompt = req.prompt
        params = _params(req, GenerationParams(max_new_tokens=16), limits).model_copy(update={
            "stop_token_ids": req.stop_token_ids or [], "logprob_token_ids": req.logprob_token_ids or [],
            "top_logprobs": 0 if req.logprob_token_ids else min(req.logprobs or 0, 20),
            "prompt_logprobs": req.prompt_logprobs is not None})
        cid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def body(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            return {"id": cid, "object": "text_completion", "created": now, "model": model_name,
                    "choices": choices, **extra}

        if req.stream:
            work = inflight.admit(generator.stream(prompt, params))
            include_usage = bool((req.stream_options or {}).get("include_usage"))

            async def sse() -> AsyncIterator[str]:
                n = 0
                try:
                    async for chunk in _events(work, request, limits.timeout_s):
                        n = chunk.completion_tokens
                        yield json.dumps(body([{"index": 0, "text": chunk.text, "logprobs": None,
                                                "finish_reason": chunk.finish_reason}]), ensure_ascii=False)
                        if chunk.finish_reason is not None and include_usage:
                            yield json.dumps(body([], usage={"prompt_tokens": chunk.prompt_tokens,
                                                              "completion_tokens": n,
                                                              "total_tokens": chunk.prompt_tokens + n}))
                except _Timeout:
                    yield json.dumps(error_body(f"the request took longer than {limits.timeout_s:g}s",
                                                "server_error", code="timeout"))
                except (ShuttingDown, RagError) as e:
                    yield json.dumps(error_body(str(e), "server_error", code=type(e).__name__))
                except _Disconnected:
                    return
                finally:
                    inflight.done(work)
                yield "[DONE]"

            return EventSourceResponse(sse(), sep="\n", ping=15, shutdown_grace_period=2.0)

        async def one() -> AsyncIterator[Generation]:
            yield (await generator.agenerate([prompt], params))[0]

        g = await last_event(inflight.admit(one()), request)
        if g is None:
            return Response(status_code=499)
        choice: dict[str, Any] = {"index": 0, "text": g.text, "finish_reason": g.finish_reason,
                                  "logprobs": _completion_logprobs(g, generator, req)}
        if req.return_token_ids:
            choice["token_ids"] = g.token_ids
        if req.prompt_logprobs is not None:  # vLLM's shape: None, then {id: {logprob}} per prompt token
            ids = generator.prompt_ids(prompt)
            choice["prompt_logprobs"] = [None] + [{str(t): {"logprob": lp}}
                                                  for t, lp in zip(ids[1:], g.prompt_logprobs, strict=True)]
        n = len(g.token_ids)
        return JSONResponse(body([choice], usage={"prompt_tokens": g.prompt_tokens, "completion_tokens": n,
                                                  "total_tokens": g.prompt_tokens + n}))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        req = await parse(request, ChatRequest)
        messages = _messages(req, limits)
        params = _params(req, pipeline.config.generation, limits) if pipeline.generator else None
        opts = req.rag or RagOptions()
        if opts.top_k is not None and opts.top_k > limits.max_top_k:
            raise HTTPError(400, f"rag.top_k={opts.top_k} exceeds the limit of {limits.max_top_k}",
                            param="rag.top_k")
        pipeline.validate(messages)  # role/order errors become 400 before admission
        work = inflight.admit(pipeline.astream(messages, top_k=opts.top_k, params=params))
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return EventSourceResponse(_sse(work, request, cid, now, opts), sep="\n", ping=15,
                                       shutdown_grace_period=2.0)
        done = await last_event(work, request)
        if done is None:
            return Response(status_code=499)  # nobody reads it; the generation was aborted
        answer = done.answer
        metrics.observe(answer)
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": now, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "finish_reason": answer.finish_reason, "logprobs": None}],
            "usage": _usage(answer), "rag": _rag_extension(answer, opts)})

    async def _sse(work: _Work, request: Request, cid: str, now: int, opts: RagOptions) -> AsyncIterator[str]:
        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            return json.dumps({"id": cid, "object": "chat.completion.chunk", "created": now,
                               "model": model_name, "choices": [{"index": 0, "delta": delta,
                                                                 "finish_reason": finish}], **extra},
                              ensure_ascii=False)

        def error(message: str, type: str, code: str) -> str:
            return json.dumps(error_body(message, type, code=code))

        try:
            yield chunk({"role": "assistant", "content": ""})
            async for event in _events(work, request, limits.timeout_s):
                if isinstance(event, TextEvent):
                    yield chunk({"content": event.text})
                elif isinstance(event, SourcesEvent) and opts.include_sources:
                    sources: dict[str, Any] = {"sources": [h.to_json() for h in event.hits]}
                    if event.retrieval is not None:
                        sources["retrieval"] = event.retrieval.model_dump()
                    yield chunk({}, rag=sources)
                elif isinstance(event, DoneEvent):
                    answer = event.answer
                    metrics.observe(answer)
                    yield chunk({}, answer.finish_reason, usage=_usage(answer),
                                rag=_rag_extension(answer, opts))
        except _Timeout:
            yield error(f"the request took longer than {limits.timeout_s:g}s", "server_error", "timeout")
        except _Disconnected:
            return
        except ShuttingDown as e:
            yield error(str(e), "server_error", "shutting_down")
        except RagError as e:
            yield error(str(e), _status(e)[1], type(e).__name__)
        finally:
            inflight.done(work)
        yield "[DONE]"

    return app


def serve(pipeline: Any, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: ServiceLimits | None = None, runs_dir: Path | None = None) -> None:
    """Run the service with uvicorn (blocking). SIGTERM or Ctrl-C aborts in-flight requests at
    once, and the pipeline's engine (threads and processes) is shut down before this returns."""
    try:
        import uvicorn
    except ImportError:
        raise missing_extra("uvicorn", "serve") from None
    pipeline.load()  # the engine starts before the port opens, not on the first request
    app = create_app(pipeline, api_key=api_key, limits=limits, runs_dir=runs_dir)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            loop = getattr(self, "_rag_loop", None)
            if loop is not None:  # abort in-flight work now, not after the grace period
                loop.call_soon_threadsafe(app.state.inflight.abort_all)
            super().handle_exit(sig, frame)

        async def serve(self, sockets: Any = None) -> None:
            self._rag_loop = asyncio.get_running_loop()
            await super().serve(sockets)

    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                   timeout_graceful_shutdown=5))
    try:
        server.run()
    finally:
        pipeline.close()
