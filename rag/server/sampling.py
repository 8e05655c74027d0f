"""Request fields -> library values: generation settings and chat messages, within the limits."""

from __future__ import annotations

from rag.generation import Generator
from rag.server.errors import HTTPError
from rag.server.protocol import ContentPart, MessageIn, SamplingRequest, ServiceLimits
from rag.types import ChatMessage, GenerationParams


def refuse_unsupported(req: SamplingRequest) -> None:
    """400 for a field this server does not honour (`protocol.REFUSED`), naming it and why."""
    refused = req.refused()
    if refused is not None:
        name, why = refused
        raise HTTPError(400, f"{name} is not supported: {why}", param=name, code="unsupported_field")


def response_format(req: SamplingRequest) -> dict[str, object]:
    """``response_format`` as generation settings: ``json_object``, or ``json_schema`` with its
    ``schema`` (the generator refuses either unless it has structured outputs)."""
    fmt = req.response_format
    kind = fmt.type if fmt is not None else "text"
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        assert fmt is not None
        if fmt.json_schema is None:
            raise HTTPError(400, "response_format.json_schema is required with type json_schema",
                            param="response_format.json_schema")
        return {"json_schema": fmt.json_schema.schema_}
    return {}


def generation_params(req: SamplingRequest, base: GenerationParams, limits: ServiceLimits) -> GenerationParams:
    """``base`` (the pipeline's settings) with the request's sampling fields applied; 400 for a
    field it cannot honour."""
    refuse_unsupported(req)
    if req.n != 1:
        raise HTTPError(400, f"n={req.n} is not supported; only n=1", param="n")
    max_tokens = req.token_limit
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise HTTPError(400, f"max_tokens={max_tokens} exceeds this server's limit of "
                             f"{limits.max_tokens}", param="max_tokens")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    given = {"max_new_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p,
             "top_k": max(req.top_k, 0) if req.top_k is not None else None, "seed": req.seed}
    update: dict[str, object] = {k: v for k, v in given.items() if v is not None}
    update.update(response_format(req))
    update["stop"] = list(dict.fromkeys(base.stop + stops))
    if req.stop_token_ids:
        update["stop_token_ids"] = list(dict.fromkeys(base.stop_token_ids + req.stop_token_ids))
    if req.min_tokens is not None:
        update["min_new_tokens"] = min(req.min_tokens, max_tokens or base.max_new_tokens)
    return base.model_copy(update=update)


def check_text(text: str, param: str) -> str:
    """``text``, or a 400 when it holds a lone surrogate (JSON's ``\\ud800``: not UTF-8, so no
    tokenizer can take it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise HTTPError(400, f"{param} holds an unpaired surrogate (\\u{ord(text[e.start]):04x} at character "
                             f"{e.start}), which is not text; send valid Unicode", param=param) from None
    return text


def _content(i: int, content: str | list[ContentPart] | None) -> str:
    """A message's text: a string, or the text parts of a list joined by newlines."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        if part.type != "text":
            raise HTTPError(400, f"{where} has type {part.type!r}; this server accepts text only "
                                 "(type 'text')", param=f"{where}.type")
        if part.text is None:
            raise HTTPError(400, f"{where} has no 'text'", param=f"{where}.text")
        texts.append(part.text)
    return "\n".join(texts)


def chat_messages(messages: list[MessageIn], limits: ServiceLimits) -> list[ChatMessage]:
    """The conversation, within the limits (roles and order are the pipeline's to check)."""
    if not messages:
        raise HTTPError(400, "messages must not be empty", param="messages")
    if len(messages) > limits.max_messages:
        raise HTTPError(400, f"{len(messages)} messages exceed the limit of {limits.max_messages}",
                        param="messages")
    out = []
    for i, m in enumerate(messages):
        if m.role == "tool" or m.tool_calls is not None or m.tool_call_id is not None:
            raise HTTPError(400, f"messages[{i}].role {m.role!r} is not supported with tool calls: tool calling "
                                 "is not implemented", param=f"messages[{i}]", code="unsupported_field")
        content = _content(i, m.content)
        if len(content) > limits.max_message_chars:
            raise HTTPError(400, f"messages[{i}].content has {len(content)} characters; the limit "
                                 f"is {limits.max_message_chars}", param=f"messages[{i}].content")
        out.append(ChatMessage(role=m.role, content=check_text(content, f"messages[{i}].content")))
    return out


def message_dicts(messages: list[MessageIn], limits: ServiceLimits) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in chat_messages(messages, limits)]


def check_top_k(top_k: int | None, limits: ServiceLimits, param: str) -> None:
    if top_k is not None and top_k > limits.max_top_k:
        raise HTTPError(400, f"{param}={top_k} exceeds the limit of {limits.max_top_k}", param=param)


def check_structured(params: GenerationParams, generator: Generator | None, kind: str) -> None:
    """400 up front (not mid-stream) for JSON asked of a generator or pipeline kind that cannot
    give it: structured outputs need a vllm generator, and Self-RAG's reflection tokens are not JSON."""
    if params.json_schema is None and not params.json_object:
        return
    if kind not in ("chat", "model"):
        raise HTTPError(400, f"response_format is not supported by a {kind} pipeline", param="response_format",
                        code="unsupported_field")
    if generator is None or not generator.structured_outputs:
        raise HTTPError(400, "response_format needs structured outputs, which this pipeline's generator backend "
                             "lacks; serve a pipeline with generator.backend vllm", param="response_format",
                        code="unsupported_field")


def check_stream_options(req: SamplingRequest) -> bool:
    """Whether a stream ends with a usage chunk (``stream_options.include_usage``); 400 for
    ``stream_options`` without ``stream``, as OpenAI answers."""
    if req.stream_options is None:
        return False
    if not req.stream:
        raise HTTPError(400, "stream_options is only allowed when stream is true", param="stream_options")
    return req.stream_options.include_usage
