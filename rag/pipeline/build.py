"""`build_pipeline`: the generator and retriever a config names, in the pipeline of its kind."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rag.config import PipelineConfig, RetrievalPipelineConfig, SelfRagPipelineConfig
from rag.errors import ConfigError
from rag.generation import Generator, load_generator
from rag.retriever import Retriever, load_retriever, open_retriever

if TYPE_CHECKING:
    from rag.pipeline import Pipeline


def build_pipeline(config: PipelineConfig, *, index: str | Path | None = None,
                   generator: Generator | None = None, retriever: Retriever | None = None,
                   follow: bool = True) -> Pipeline:
    """Load the generator and retriever a config names (``index`` overrides the config's).
    ``follow``: the retriever serves each newly published version of the index folder (servers,
    chats); false keeps the version opened now (evaluation runs, so every question sees one).

    Returns a `rag.pipeline.Pipeline`: `ChatRagPipeline`, `SelfRagPipeline` or
    `RetrievalPipeline` by ``config.kind``."""
    from rag.pipeline import ChatRagPipeline, RetrievalPipeline, SelfRagPipeline

    folder = index or config.index
    if retriever is None and folder is not None and config.retrieval.mode != "none":
        retriever = (load_retriever if follow else open_retriever)(
            folder, config.retrieval.mode, device=config.retrieval.device, fusion=config.retrieval.fusion.model_dump())
    if isinstance(config, RetrievalPipelineConfig):
        if retriever is None:
            raise ConfigError(f"pipeline {config.name!r} is retrieval-only and needs an index (--index)")
        return RetrievalPipeline(config, retriever)
    if generator is None:
        g = config.generator
        kw: dict[str, Any] = {"dtype": g.dtype}
        if g.backend == "hf":
            kw.update(batch_size=g.batch_size, max_model_len=g.max_model_len)
        elif g.backend == "vllm":
            kw.update(max_model_len=g.max_model_len, gpu_memory_utilization=g.gpu_memory_utilization)
        elif g.backend == "openai":
            kw = {"base_url": g.base_url, "api_key_env": g.api_key_env, "tokenizer": g.tokenizer,
                  "timeout_s": g.timeout_s, "max_retries": g.max_retries}
        else:
            raise ConfigError("the scripted backend needs a generator object (tests and demos)")
        generator = load_generator(g.backend, g.model, **kw)
    if isinstance(config, SelfRagPipelineConfig):
        return SelfRagPipeline(config, generator, retriever)
    return ChatRagPipeline(config, generator, retriever)


def build_pipelines(configs: Sequence[PipelineConfig], *, index: str | Path | None = None,
                    follow: bool = True,
                    retriever_for: Callable[[PipelineConfig], Retriever | None] | None = None) -> list[Pipeline]:
    """Several pipelines (one server's): those whose ``generator`` settings are equal share one
    generator object, so one engine, one model load. ``retriever_for``: a retriever made
    elsewhere for a config (Ray shard deployments), or None to open its index here."""
    shared: dict[str, Generator] = {}
    out: list[Pipeline] = []
    for config in configs:
        key = None if isinstance(config, RetrievalPipelineConfig) else config.generator.model_dump_json()
        pipe = build_pipeline(config, index=index, generator=shared.get(key) if key else None, follow=follow,
                              retriever=retriever_for(config) if retriever_for else None)
        if key is not None and pipe.generator is not None:
            shared.setdefault(key, pipe.generator)
        out.append(pipe)
    return out
