"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's shapes) with the served model's tokenizer."""

from __future__ import annotations

from fastapi import APIRouter

from rag.generation import Generator
from rag.server.errors import HTTPError
from rag.server.protocol import Detokenized, DetokenizeRequest, Tokenized, TokenizeRequest
from rag.server.sampling import message_dicts
from rag.server.state import ServerState, State

router = APIRouter()


def _generator(state: ServerState, model: str | None) -> Generator:
    served = state.pick(model)
    if served.pipeline.generator is None:
        raise HTTPError(400, f"the pipeline {served.name!r} has no generator (kind: retrieval)", param="model")
    return served.pipeline.generator


@router.post("/tokenize")
def tokenize(req: TokenizeRequest, state: State) -> Tokenized:
    """The ids the model is fed for ``prompt`` (BOS once when the tokenizer adds one), or for
    ``messages`` rendered with the tokenizer's chat template."""
    generator = _generator(state, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise HTTPError(400, "give exactly one of prompt and messages", param="prompt")
    if not req.add_special_tokens or (req.messages is not None and not req.add_generation_prompt):
        raise HTTPError(400, "only add_special_tokens: true and add_generation_prompt: true are supported",
                        param="add_special_tokens")
    text = req.prompt
    if text is None:
        text = generator.render_chat(message_dicts(req.messages or [], state.limits))
    if len(text) > state.limits.max_message_chars * state.limits.max_messages:
        raise HTTPError(400, f"the text has {len(text)} characters, more than this server tokenizes", param="prompt")
    ids = generator.encode(text)
    strs = [generator.decode([i]) for i in ids] if req.return_token_strs else None
    return Tokenized(count=len(ids), max_model_len=generator.limits()[1], tokens=ids, token_strs=strs)


@router.post("/detokenize")
def detokenize(req: DetokenizeRequest, state: State) -> Detokenized:
    generator = _generator(state, req.model)
    vocab = generator.limits()[0]
    bad = sorted({t for t in req.tokens if t >= vocab})
    if bad:
        raise HTTPError(400, f"tokens {bad[:5]} are outside this model's vocabulary (0..{vocab - 1})", param="tokens")
    return Detokenized(prompt=generator.decode(req.tokens))
