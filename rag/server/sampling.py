"""Request fields -> library values: generation settings and chat messages, within the limits."""

from __future__ import annotations

from rag.server.errors import HTTPError
from rag.server.protocol import ChatRequest, ContentPart, SamplingRequest, ServiceLimits
from rag.types import ChatMessage, GenerationParams


def generation_params(req: SamplingRequest, base: GenerationParams, limits: ServiceLimits) -> GenerationParams:
    """``base`` (the pipeline's settings) with the request's sampling fields applied."""
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
    update["stop"] = list(dict.fromkeys(base.stop + stops))
    if req.min_tokens is not None:
        update["min_new_tokens"] = min(req.min_tokens, max_tokens or base.max_new_tokens)
    return base.model_copy(update=update)


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


def chat_messages(req: ChatRequest, limits: ServiceLimits) -> list[ChatMessage]:
    """The conversation, within the limits (roles and order are the pipeline's to check)."""
    if not req.messages:
        raise HTTPError(400, "messages must not be empty", param="messages")
    if len(req.messages) > limits.max_messages:
        raise HTTPError(400, f"{len(req.messages)} messages exceed the limit of {limits.max_messages}",
                        param="messages")
    out = []
    for i, m in enumerate(req.messages):
        content = _content(i, m.content)
        if len(content) > limits.max_message_chars:
            raise HTTPError(400, f"messages[{i}].content has {len(content)} characters; the limit "
                                 f"is {limits.max_message_chars}", param=f"messages[{i}].content")
        out.append(ChatMessage(role=m.role, content=content))
    return out


def check_top_k(top_k: int | None, limits: ServiceLimits, param: str) -> None:
    if top_k is not None and top_k > limits.max_top_k:
        raise HTTPError(400, f"{param}={top_k} exceeds the limit of {limits.max_top_k}", param=param)
