"""The service's request and response models (OpenAI's shapes, plus the ``rag`` extension).

Requests are validated against these models; responses are built from them, so every field a
client may read is declared here. ``ServiceLimits`` caps what one request may ask for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rag.types import Answer, TokenLogprob


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


#: Strict request models: no ``true`` for an integer, no ``"yes"`` for a boolean, no unknown field.
_STRICT = ConfigDict(strict=True, extra="forbid")

#: Fields OpenAI documents that change nothing about an answer here: accepted and ignored.
HARMLESS = ("user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
            "parallel_tool_calls")

#: Fields this server does not honour, and why: a request that sets one is refused (400), not
#: answered as if it had not.
REFUSED = {
    "tools": "tool calling is not implemented; describe the tools in a message instead",
    "tool_choice": "tool calling is not implemented",
    "functions": "function calling is not implemented",
    "function_call": "function calling is not implemented",
    "logit_bias": "logit_bias is not implemented",
    "presence_penalty": "presence_penalty is not implemented (send 0 or leave it out)",
    "frequency_penalty": "frequency_penalty is not implemented (send 0 or leave it out)",
    "audio": "this server generates text only",
    "modalities": "this server generates text only",
    "prediction": "predicted outputs are not implemented",
    "web_search_options": "web search is not implemented; the pipeline retrieves from its index",
    "reasoning_effort": "the served models do not reason in a separate channel",
    "best_of": "best_of is not implemented; only one completion per request",
    "suffix": "suffix (insertion) is not implemented",
}
_NEUTRAL: tuple[Any, ...] = (None, 0, 0.0, [], {}, ["text"])  # a refused field set to these is a no-op

#: A stop list: each string 1-256 characters, at most 16 of them.
StopText = Annotated[str, Field(min_length=1, max_length=256)]
#: A token id (the vocabulary check comes later, against the model).
TokenId = Annotated[int, Field(ge=0, lt=2**31)]


class RagOptions(BaseModel):
    """Request extension ``rag``."""

    model_config = _STRICT
    top_k: int | None = Field(None, ge=1, description="passages to retrieve")
    include_trace: bool = False
    include_sources: bool = False


class ContentPart(BaseModel):
    """One part of a list ``content``; only ``type: text`` is accepted."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class MessageIn(BaseModel):
    model_config = _STRICT  # tool_calls, tool_call_id...: unknown fields, refused
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None  # accepted, no effect
    tool_calls: Any = None  # refused: tool calling is not implemented
    tool_call_id: Any = None


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: honoured through vLLM's structured outputs (the vllm
    backends); another backend refuses json_object/json_schema."""

    model_config = _STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingRequest(BaseModel):
    """The fields both completion routes share. Every field is honoured, listed in `HARMLESS`
    (accepted, no effect) or in `REFUSED` (400 when set); anything else is a 400 too."""

    model_config = _STRICT
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="vLLM's extension: sample from the k likeliest (0, -1: all)")
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopText | list[StopText] | None = Field(None, max_length=16)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    min_tokens: int | None = Field(None, ge=0, description="vLLM's extension: generate at least N tokens")
    stop_token_ids: list[TokenId] | None = Field(None, max_length=64)
    response_format: ResponseFormat | None = None
    # accepted, no effect (HARMLESS)
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    parallel_tool_calls: bool | None = None
    # refused when set (REFUSED)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    best_of: Any = None
    suffix: Any = None

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    def refused(self) -> tuple[str, str] | None:
        """The first field set that this server refuses, with why."""
        for name, why in REFUSED.items():
            if name in self.model_fields_set and getattr(self, name) not in _NEUTRAL:
                return name, why
        return None


class ChatRequest(SamplingRequest):
    """The OpenAI chat completion request."""

    messages: list[MessageIn]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    rag: RagOptions | None = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


#: ``prompt``: one text, a list of texts, token ids, or a list of token-id lists.
PromptIn = str | list[str] | list[TokenId] | list[list[TokenId]]


class CompletionRequest(SamplingRequest):
    """``/v1/completions`` on the served model, no retrieval: one prompt or a list of them
    (texts or token ids), with vLLM's extensions for exact logprobs (what the remote backend
    sends) and ``echo`` (lm-evaluation-harness's loglikelihood)."""

    prompt: PromptIn = Field(description="text (tokenized by the server) or token ids; or a list of either")
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    logprob_token_ids: list[TokenId] | None = Field(None, max_length=64)
    return_tokens_as_token_ids: bool = False
    return_token_ids: bool = False
    prompt_logprobs: int | None = Field(None, ge=0, le=0, description="0: each prompt token's own logprob")
    skip_special_tokens: Literal[False] | None = Field(None, description="vLLM's extension; only false: the "
                                                       "text keeps special tokens")
    spaces_between_special_tokens: Literal[False] | None = None

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs is not None or bool(self.logprob_token_ids) or self.prompt_logprobs is not None

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list (one prompt is a list of one)."""
        p = self.prompt
        if isinstance(p, str) or (p and all(isinstance(x, int) for x in p)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class EmbeddingRequest(BaseModel):
    """OpenAI's ``/v1/embeddings``: the pipeline's query encoder."""

    model_config = _STRICT
    model: str = Field(min_length=1)
    input: str | list[str] = Field(description="a text or a list of texts (token ids are not accepted)")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class TokenizeRequest(BaseModel):
    """vLLM's ``/tokenize``: a prompt or chat messages to token ids."""

    model_config = _STRICT
    model: str | None = None
    prompt: str | None = None
    messages: list[MessageIn] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class RerankDocument(BaseModel):
    model_config = _STRICT
    text: str


class RerankRequest(BaseModel):
    """Cohere/Jina's rerank request (as vLLM serves it)."""

    model_config = _STRICT
    model: str | None = None
    query: str = Field(min_length=1)
    documents: list[str | RerankDocument]
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = True


class DetokenizeRequest(BaseModel):
    model_config = _STRICT
    model: str | None = None
    tokens: list[TokenId]


class RetrieveRequest(BaseModel):
    model_config = _STRICT
    model: str | None = Field(None, description="the pipeline to search (default: the first served)")
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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]

    @classmethod
    def of(cls, token: str, logprob: float) -> TopLogprob:
        return cls(token=token, logprob=max(logprob, -9999.0), bytes=list(token.encode("utf-8")))


class ContentLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """OpenAI's chat ``logprobs``: per token of the raw completion (before the answer is cleaned),
    its top alternatives likeliest first."""

    content: list[ContentLogprob]

    @classmethod
    def of(cls, tokens: Sequence[TokenLogprob], decode: Callable[[list[int]], str], top: int) -> ChatLogprobs:
        out = []
        for t in tokens:
            alts = [TopLogprob.of(decode([i]), lp) for i, lp in sorted(t.top.items(), key=lambda kv: -kv[1])[:top]]
            out.append(ContentLogprob(**TopLogprob.of(decode([t.id]), t.logprob).model_dump(), top_logprobs=alts))
        return cls(content=out)


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


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
    """Per token; with ``echo`` the first prompt token's logprob and top are null."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
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


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # base64: little-endian float32


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: UsageOut = Field(description="not counted here (0)")


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: dict[str, str] | None = None


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]


class Tokenized(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class Detokenized(BaseModel):
    prompt: str


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


class PipelineHealth(IndexStatus):
    model: str
    generator: str | None = None
    ok: bool
    error: str | None = None


class Health(IndexStatus):
    """The first served pipeline's fields at the top (one-pipeline clients), every one in
    ``pipelines``."""

    status: Literal["ok", "error"] = "ok"
    model: str
    generator: str | None
    inflight: int
    pipelines: list[PipelineHealth]


class Info(BaseModel):
    """What the playground needs to know about one served pipeline (and which others it may pick)."""

    model: str
    models: list[str]
    generator: str | None
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
