"""Pydantic models that cross module boundaries."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Passage(_Frozen):
    """One retrievable unit of text."""

    id: str
    title: str = ""
    text: str
    meta: dict[str, Any] = Field(default_factory=dict)

    @property
    def title_text(self) -> str:
        """``title\ntext``, or the text alone when there is no title (what is embedded and
        shown to chat models)."""
        return f"{self.title}\n{self.text}" if self.title else self.text


class Hit(_Frozen):
    """A passage returned by a retriever, with its score and 1-based rank."""

    passage: Passage
    score: float
    rank: int

    def to_json(self) -> dict[str, Any]:
        p = self.passage
        return {"id": p.id, "title": p.title, "text": p.text, "score": self.score,
                "rank": self.rank, "meta": p.meta}


Role = Literal["system", "user", "assistant"]


class ChatMessage(_Frozen):
    role: str
    content: str


class GenerationParams(_Frozen):
    """Decoding settings shared by every backend."""

    max_new_tokens: int = Field(256, ge=1, le=32768, description="tokens to generate at most")
    min_new_tokens: int = Field(0, ge=0, le=32768, description="tokens to generate before EOS may end it")
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="sample from the k likeliest tokens (0: no top-k cut)")
    seed: int | None = None
    stop: list[str] = Field(default_factory=list, description="stop strings (not in the text)")
    stop_token_ids: list[int] = Field(default_factory=list, description="extra stop tokens")
    logprob_token_ids: list[int] = Field(
        default_factory=list, max_length=128,
        description="token ids whose exact logprob is returned at every generated position")
    top_logprobs: int = Field(0, ge=0, le=20, description="also return the top-k logprobs")
    want_logprobs: bool = Field(False, description="a chat answer carries its tokens' logprobs (not when streaming)")
    prompt_logprobs: bool = Field(False, description="also return the logprob of every prompt token "
                                  "after the first (not when streaming)")
    prompt_top_logprobs: int = Field(0, ge=0, le=20, description="with prompt_logprobs: also the top-k "
                                     "logprobs at each of those prompt positions")
    json_schema: dict[str, Any] | None = Field(None, description="constrain the text to JSON valid under "
                                               "this schema (vllm backends only)")
    json_object: bool = Field(False, description="constrain the text to a JSON object (vllm backends only)")
    prompt_logprobs_tail: int = Field(
        0, ge=0, description="with prompt_logprobs: only those of the prompt's last N tokens (0: all); "
        "for a one-token request without stop strings in-process vLLM then skips the logits of the "
        "positions its prefix cache covers (the rest of the prompt is prefilled first)")


class Generation(_Frozen):
    """One completion in backend-neutral form (special tokens kept in ``text``).

    ``logprobs[i]`` maps each requested token id to its log-probability at generated position
    ``i`` (from the raw next-token distribution); ``token_logprobs[i]`` is the log-probability of
    the token actually generated there; ``prompt_logprobs`` (when asked for) those of the prompt's
    tokens after the first, or of its last ``prompt_logprobs_tail`` tokens.
    """

    text: str
    token_ids: list[int]
    token_logprobs: list[float]
    logprobs: list[dict[int, float]] = Field(default_factory=list)
    top_logprobs: list[dict[int, float]] = Field(default_factory=list)
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int = 0
    prompt_logprobs: list[float] = Field(default_factory=list, description="prompt token i+1 given 0..i "
                                         "(the last prompt_logprobs_tail of them when that is set)")
    prompt_top_logprobs: list[dict[int, float]] = Field(default_factory=list, description="the top-k "
                                                        "logprobs at the positions of prompt_logprobs")

    @property
    def cumulative_logprob(self) -> float:
        return float(sum(self.token_logprobs))


class Citation(_Frozen):
    id: str
    title: str
    score: float


class CandidateScores(_Frozen):
    """Self-RAG critique of one candidate (one passage) and its combined score."""

    passage_id: str | None
    text: str
    s_rel: float
    s_sup: float | None = Field(None, description="None: not asked (a prompted critic's only candidate "
                                "after the relevance screen; selfrag.critique_single asks it)")
    s_use: float | None = None
    seq: float
    total: float
    s_ret: float = Field(0.0, description="retrieval prior 1/rank (weighted by w_ret in total)")


class Usage(_Frozen):
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Timings(_Frozen):
    """Seconds spent per stage, per question (batch calls divide their time evenly)."""

    retrieval_s: float = 0.0
    generation_s: float = 0.0
    critique_s: float = 0.0
    first_token_s: float | None = Field(None, description="streaming: request start -> first text")


class RetrievalDecision(_Frozen):
    """Self-RAG: whether the pipeline retrieved, and why."""

    decision: Literal["retrieve", "no_retrieval"]
    probability: float | None = Field(None, description="adaptive mode: the normalised ratio")
    mode: Literal["always", "never", "adaptive"]
    critic: str
    votes: dict[str, float] = Field(default_factory=dict, description="closed tasks: score per answer")


class TreeNode(_Frozen):
    """One node of a Self-RAG long-form search tree."""

    id: int
    parent: int | None
    depth: int
    passage_id: str | None
    segment: str
    score: float | None
    done: bool


class TokenLogprob(_Frozen):
    """One generated token: its id, log-probability, and the top-k alternatives (id -> logprob)."""

    id: int
    logprob: float
    top: dict[int, float] = Field(default_factory=dict)


class Trace(_Frozen):
    """How an answer was produced (``include_trace``); every field optional."""

    prompt: str | None = None
    raw_completion: str | None = None
    query: str | None = Field(None, description="what was searched (retrieval.query; history: 'last || joined')")
    critic: str | None = None
    best_candidate: int | None = None
    tree: list[TreeNode] = Field(default_factory=list)
    best_node: int | None = None


FinishReason = Literal["stop", "length"]


class Answer(_Frozen):
    """What every pipeline returns, whatever the entry point."""

    text: str
    citations: list[Citation] = Field(default_factory=list)
    hits: list[Hit] = Field(default_factory=list)
    scores: list[CandidateScores] = Field(default_factory=list)
    retrieval: RetrievalDecision | None = None
    usage: Usage = Usage()
    timings: Timings = Timings()
    finish_reason: FinishReason = "stop"
    trace: Trace = Trace()
    logprobs: list[TokenLogprob] | None = Field(None, description="the raw completion's tokens (before "
                                                "cleaning), when the generation was asked for logprobs")

    def to_json(self, *, include_trace: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "answer": self.text,
            "citations": [c.model_dump() for c in self.citations],
            "hits": [h.to_json() for h in self.hits],
            "finish_reason": self.finish_reason,
            "usage": self.usage.model_dump(),
        }
        if self.scores:
            out["scores"] = [s.model_dump() for s in self.scores]
        if self.retrieval is not None:
            out["retrieval"] = self.retrieval.model_dump()
        if include_trace:
            out["timings"] = self.timings.model_dump()
            out["trace"] = self.trace.model_dump(exclude_defaults=True)
        return out


# --- streaming ----------------------------------------------------------------------------


class GenerationChunk(_Frozen):
    """One step of a generator's token stream: the new text (special tokens kept) and the
    running counts; ``finish_reason`` is set on the last chunk only."""

    text: str
    completion_tokens: int
    prompt_tokens: int = 0
    finish_reason: FinishReason | None = None


class SourcesEvent(_Frozen):
    """A pipeline stream's first event: the passages the answer will use."""

    type: Literal["sources"] = "sources"
    hits: list[Hit]
    retrieval: RetrievalDecision | None = None
    cut: int = Field(0, ge=0, description="passages retrieved but left out: the context budget was full")
    query: str | None = Field(None, description="what was searched (the pipeline's query strategy)")


class TextEvent(_Frozen):
    """Cleaned answer text, in order; the pieces concatenate to ``Answer.text``."""

    type: Literal["text"] = "text"
    text: str


class DoneEvent(_Frozen):
    """The last event: the complete `Answer` (usage, timings, finish reason)."""

    type: Literal["done"] = "done"
    answer: Answer


AnswerEvent = SourcesEvent | TextEvent | DoneEvent


# --- what a pipeline says about itself (faces ask for this instead of reaching inside) ------


class IndexInfo(_Frozen):
    """The index folder a retriever serves and the version it serves now."""

    index: str | None = None
    version: int | None = None
    passages: int = 0
    built_at: str | None = None
    changes: int = 0
    follows: bool = False


class PipelineInfo(_Frozen):
    """A pipeline's name, kind, model, retrieval settings and index (``/v1/info``, ``/health``)."""

    name: str
    kind: str
    generator: str | None
    retrieval_mode: str | None
    search_modes: list[str]
    top_k: int
    index: IndexInfo | None
    generation: GenerationParams | None = Field(None, description="the default generation settings")
    max_tokens: int | None
