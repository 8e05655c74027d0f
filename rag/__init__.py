"""rag: retrieval-augmented generation pipelines.

`import rag` is cheap: names below are imported on first use, and no heavy library (torch,
transformers, sentence_transformers, vllm, faiss) is imported until a component is loaded.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "RagError": "rag.errors",
    "ConfigError": "rag.errors",
    "CorpusError": "rag.errors",
    "IndexMismatchError": "rag.errors",
    "BackendUnavailableError": "rag.errors",
    "Passage": "rag.types",
    "Hit": "rag.types",
    "ChatMessage": "rag.types",
    "read_corpus": "rag.corpus",
    "PassageStore": "rag.store",
    "SentenceTransformerEmbedder": "rag.embedding",
    "load_embedder": "rag.embedding",
    "FaissIndex": "rag.index",
    "build_index": "rag.index",
    "add_to_index": "rag.index",
    "IndexRecipe": "rag.config",
    "DenseRetriever": "rag.retriever",
    "BM25Retriever": "rag.retriever",
    "HybridRetriever": "rag.retriever",
    "load_retriever": "rag.retriever",
    "Answer": "rag.types",
    "Pipeline": "rag.pipeline",
    "build_pipeline": "rag.pipeline",
    "load_pipeline_config": "rag.config",
    "Generator": "rag.generation",
    "load_generator": "rag.generation",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rag' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
