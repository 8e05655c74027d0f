"""The SciPhi-Self-RAG-Mistral-7B-32k card's own call shape.

The card drives the model through ``SciPhiLLMInterface.get_chat_completion(conversation,
generation_config)``: a ``list[dict]`` conversation (``role``/``content``) and a sciphi
``GenerationConfig``. `get_chat_completion` takes the same two arguments (the config as that
object, any object with those attributes, or a dict) and runs them through a `ChatRagPipeline`,
so code written against the card runs on ``rag`` unchanged::

    from rag.sciphi import SciPhiInterface
    llm = SciPhiInterface(build_pipeline(load_pipeline_config("pipelines/sciphi-chat.yaml")))
    llm.get_chat_completion([{"role": "user", "content": "..."}],
                            {"max_tokens_to_sample": 256, "stop_token": "<paragraph>"})

Options a generator cannot honour are errors that name the option, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from rag.errors import ConfigError
from rag.types import ChatMessage, GenerationParams

if TYPE_CHECKING:
    from rag.pipeline import Pipeline

#: options of sciphi's GenerationConfig that change nothing here (model choice, prompt assembly)
IGNORED = ("model_name", "add_generation_prompt", "generate_with_chat", "skip_special_tokens", "api_base",
           "llm_provider")


def _options(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "__dict__"):
        return {k: v for k, v in vars(config).items() if not k.startswith("_")}
    raise ConfigError(f"generation_config must be a mapping or an object with attributes, got {type(config).__name__}")


def generation_params(config: Any, base: GenerationParams) -> GenerationParams:
    """`GenerationParams` from a sciphi ``GenerationConfig`` (object or dict) over ``base``.

    The dataclass's own defaults are accepted as they are (``top_k=100`` samples from the 100
    likeliest tokens; ``stop_token=None`` is ``<paragraph>``; an empty ``add_generation_kwargs``
    passes nothing). Raises `ConfigError` for a stop token other than ``<paragraph>`` (as the
    card does), and for options the generators cannot honour: streaming (use
    `Pipeline.astream`), beam search, function calling, backend-specific extra kwargs."""
    opts = _options(config)
    stop = opts.pop("stop_token", None) or "<paragraph>"
    if stop != "<paragraph>":
        raise ConfigError(f"generation_config.stop_token is {stop!r}; the SciPhi flow only accepts "
                          "'<paragraph>' (the model stops when it asks for more evidence)")
    update: dict[str, Any] = {"stop": list(dict.fromkeys([*base.stop, "<paragraph>"]))}
    if opts.pop("do_stream", False):
        raise ConfigError("generation_config.do_stream: get_chat_completion returns the whole answer; "
                          "stream with Pipeline.astream (or rag serve with stream: true)")
    if (opts.pop("num_beams", 1) or 1) != 1:
        raise ConfigError("generation_config.num_beams: beam search is not available; use num_beams=1")
    if opts.pop("functions", None):
        raise ConfigError("generation_config.functions: function calling is not available in the SciPhi flow")
    sample = opts.pop("do_sample", None)
    if "temperature" in opts:
        update["temperature"] = float(opts.pop("temperature"))
    if sample is False:
        update["temperature"] = 0.0
    top_k = opts.pop("top_k", None)
    if top_k is not None:
        update["top_k"] = max(int(top_k), 0)  # sciphi's -1 and 0: no top-k cut
    extra = opts.pop("add_generation_kwargs", None)
    if extra:
        raise ConfigError(f"generation_config.add_generation_kwargs {sorted(extra)}: backend-specific "
                          "generation arguments are not passed on; set the named fields instead")
    if "top_p" in opts:
        update["top_p"] = float(opts.pop("top_p"))
    if "max_tokens_to_sample" in opts:
        update["max_new_tokens"] = int(opts.pop("max_tokens_to_sample"))
    for name in IGNORED:
        opts.pop(name, None)
    if opts:
        raise ConfigError(f"generation_config has options rag does not know: {sorted(opts)}")
    try:
        return GenerationParams(**{**base.model_dump(), **update})
    except ValueError as e:
        raise ConfigError(f"generation_config: {e}") from None


class SciPhiInterface:
    """`get_chat_completion` over a loaded `ChatRagPipeline` (the card's ``SciPhiLLMInterface``)."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline

    def get_chat_completion(self, conversation: Sequence[Mapping[str, str]],
                            generation_config: Any = None) -> str:
        """The cleaned completion for ``conversation``, with context retrieved for its last
        user message (see `rag.pipeline.ChatRagPipeline`)."""
        base = self.pipeline.info().generation
        if base is None:
            raise ConfigError(f"pipeline {self.pipeline.info().name!r} generates no text (kind: retrieval)")
        params = generation_params(generation_config, base)
        messages = []
        for i, m in enumerate(conversation):
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise ConfigError(f"conversation[{i}] must be a dict with 'role' and 'content'")
            messages.append(ChatMessage(role=m["role"], content=m["content"]))
        return str(self.pipeline.chat(messages, params=params).text)
