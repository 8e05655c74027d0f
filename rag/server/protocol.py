"""The service's request and response models (OpenAI's shapes, plus the ``rag`` extension).

Requests are validated against these models; responses are built from them, so every field a
client may read is declared here. ``ServiceLimits`` caps what one request may ask for.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rag.types import Answer


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


# --- requests -----------------------------------------------------------------------------------


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


class SamplingRequest(BaseModel):
    """The sampling fields both completion routes honour (other fields are ignored)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="vLLM's extension: sample from the k likeliest (0, -1: all)")
    n: int = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    min_tokens: int | None = Field(None, ge=0, description="vLLM's extension: generate at least N tokens")

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


class ChatRequest(SamplingRequest):
    """The OpenAI chat completion request."""

    messages: list[MessageIn]
    max_completion_tokens: int | None = Field(None, ge=1)
    rag: RagOptions | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingRequest):
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
    stream_options: dict[str, bool] | None = None

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None or bool(self.logprob_token_ids) or self.prompt_logprobs is not None


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str = Field(min_length=1, max_length=4096)
    top_k: int = Field(5, ge=1)
    mode: Literal["dense", "bm25", "hybrid"] | None = Field(None, description="default: the pipeline's")


# --- responses ----------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> UsageOut:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class RagExtension(BaseModel):
    """Response extension ``rag``: citations; Self-RAG scores, the chosen candidate and the
    retrieval decision; sources, timings and trace when asked."""

    model_config = ConfigDict(extra="allow")
    citations: list[dict[str, Any]] | None = None

    @classmethod
    def of(cls, answer: Answer, opts: RagOptions) -> RagExtension:
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
        return cls(**ext)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageOut
    rag: RagExtension


class ChunkChoice(BaseModel):
    index: int = 0
    delta: dict[str, str]
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    model_config = ConfigDict(extra="allow")  # usage and rag on the last chunk, rag on a sources chunk
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    model_config = ConfigDict(extra="allow")  # token_ids, prompt_logprobs when asked
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    model_config = ConfigDict(extra="allow")  # usage
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rag"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HitList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]


class IndexStatus(BaseModel):
    index: str | None = None
    version: int | None = None
    passages: int = 0


class Health(IndexStatus):
    status: Literal["ok"] = "ok"
    model: str
    generator: str | None
    inflight: int


class Info(BaseModel):
    """What the playground needs to know."""

    model: str
    kind: str
    retrieval_mode: str | None
    search_modes: list[str]
    top_k: int
    index: IndexStatus | None
    max_tokens: int | None
    runs: bool


class RunSummary(BaseModel):
    name: str
    title: str
    modified: int
    files: list[str]


class RunList(BaseModel):
    object: Literal["list"] = "list"
    data: list[RunSummary]
