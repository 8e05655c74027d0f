"""Rerankers: a second stage that rescores the first stage's top candidates for a query.

- ``cross_encoder``: sentence-transformers' `CrossEncoder` on any local model folder (or a
  cached hub id); its scores are ``CrossEncoder.predict`` on (query, passage) pairs.
- ``llm``: query likelihood (UPR, Sachan et al. 2022) with a local generator: log p(query |
  passage) from one prefill per passage, the prompted critic's relevance machinery.
- ``remote``: a Cohere/Jina-style ``POST {base_url}/rerank`` (``rag serve``'s ``/v1/rerank``,
  vLLM's ``/rerank``, a hosted API).

`rerank_hits` orders the candidates by the reranker's score, or, with ``weight`` < 1, fuses the
reranked and the first-stage rankings by weighted reciprocal rank (`rag.retriever.fuse`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from rag.embedding import passage_text
from rag.errors import ConfigError, GenerationError, missing_extra
from rag.retriever import fuse
from rag.types import Hit, Passage

if TYPE_CHECKING:
    from rag.config import RerankConfig
    from rag.generation import Generator
    from rag.prompts import ChatFormat


@runtime_checkable
class Reranker(Protocol):
    """Relevance scores of passages for a query (higher is more relevant)."""

    name: str

    def score(self, query: str, passages: Sequence[Passage]) -> list[float]: ...

    def close(self) -> None: ...


class CrossEncoderReranker:
    """`sentence_transformers.CrossEncoder` over (query, title + text) pairs; one call at a time
    (the model is shared by every thread of a server)."""

    def __init__(self, model: str, *, device: str | None = None, batch_size: int = 32, max_length: int = 512):
        self.name, self.device, self.batch_size, self.max_length = model, device, batch_size, max_length
        self._model: Any = None
        self._lock = threading.Lock()

    def load(self) -> CrossEncoderReranker:
        with self._lock:
            if self._model is None:
                try:
                    from sentence_transformers import CrossEncoder
                except ImportError:
                    raise missing_extra("sentence-transformers", "cpu") from None
                try:
                    self._model = CrossEncoder(self.name, device=self.device, max_length=self.max_length,
                                               local_files_only=True)
                except OSError as e:
                    raise ConfigError(f"cross-encoder {self.name!r} is not a local model folder or a cached "
                                      f"hub id ({e}); give retrieval.rerank.model a folder") from None
        return self

    def score(self, query: str, passages: Sequence[Passage]) -> list[float]:
        if not passages:
            return []
        self.load()
        pairs = [(query, passage_text(p.title, p.text)) for p in passages]
        with self._lock:
            scores = self._model.predict(pairs, batch_size=self.batch_size, show_progress_bar=False)
        return [float(s) for s in scores]

    def close(self) -> None:
        pass


class LLMReranker:
    """Query likelihood with a generator: each passage's score is log p(query | passage) under the
    model (`rag.selfrag.critic.query_loglikelihoods`), in the generator's chat template (plain
    text when it has none). ``owned``: the reranker loaded the generator and closes it."""

    def __init__(self, generator: Generator, *, owned: bool = False):
        self.generator, self.owned, self.name = generator, owned, generator.model_name
        self._format: ChatFormat | None = None

    def score(self, query: str, passages: Sequence[Passage]) -> list[float]:
        from rag.generation import run_sync
        from rag.prompts import get_format
        from rag.selfrag.critic import query_loglikelihoods

        if not passages:
            return []
        if self._format is None:
            self.generator.load()
            self._format = get_format("hf_template" if self.generator.has_chat_template else "plain",
                                      generator=self.generator)
        fmt = self._format
        return run_sync(lambda: query_loglikelihoods(self.generator, fmt, [(query, p) for p in passages]))

    def close(self) -> None:
        if self.owned:
            self.generator.close()


class RemoteReranker:
    """A Cohere/Jina-style rerank endpoint: ``POST {base_url}/rerank`` with ``model``, ``query``
    and ``documents``; reads ``results[].index`` and ``relevance_score``."""

    def __init__(self, model: str, *, base_url: str, api_key: str | None = None, timeout_s: float = 60.0):
        import httpx

        self.name, self.base_url = model, base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(timeout=timeout_s, headers=headers)

    def score(self, query: str, passages: Sequence[Passage]) -> list[float]:
        import httpx

        if not passages:
            return []
        body = {"model": self.name, "query": query, "top_n": len(passages),
                "documents": [passage_text(p.title, p.text) for p in passages]}
        where = f"the rerank server {self.base_url}"
        try:
            r = self._client.post(self.base_url + "/rerank", json=body)
        except httpx.HTTPError as e:
            raise GenerationError(f"could not reach {where} ({e})") from None
        if r.status_code != 200:
            raise GenerationError(f"{where} answered {r.status_code}: {r.text[:300]}")
        scores = [float("-inf")] * len(passages)
        for item in r.json().get("results", []):
            scores[int(item["index"])] = float(item["relevance_score"])
        return scores

    def close(self) -> None:
        self._client.close()


def load_reranker(config: RerankConfig, *, device: str = "auto", generator: Generator | None = None) -> Reranker:
    """The reranker a pipeline's ``retrieval.rerank`` names (``llm`` with model ``generator``:
    the pipeline's own ``generator``)."""
    if config.method == "llm":
        if config.model != "generator":
            from rag.generation.hf import TransformersGenerator

            return LLMReranker(TransformersGenerator(config.model, device="cuda" if device == "gpu" else device),
                               owned=True)
        if generator is None:
            raise ConfigError("retrieval.rerank: llm with model 'generator' needs the pipeline's generator; "
                              "this pipeline has none, so name a model")
        return LLMReranker(generator)
    if config.method == "cross_encoder":
        return CrossEncoderReranker(config.model, device=None if device == "auto" else device)
    if config.method == "remote":
        import os

        if not config.base_url:
            raise ConfigError("retrieval.rerank.method remote needs base_url (the server's API root)")
        key = os.environ.get(config.api_key_env) if config.api_key_env else None
        return RemoteReranker(config.model, base_url=config.base_url, api_key=key)
    raise ConfigError(f"unknown reranker {config.method!r}; use cross_encoder, llm or remote")


def rerank_hits(hits: Sequence[Hit], scores: Sequence[float], k: int, *, weight: float = 1.0) -> list[Hit]:
    """The top ``k`` of ``hits`` by the reranker's ``scores`` (ties keep the first-stage order),
    or, with ``weight`` < 1, by weighted reciprocal-rank fusion of the reranked order (weight
    ``weight``) with the first-stage order (``1 - weight``)."""
    order = sorted(range(len(hits)), key=lambda i: (-scores[i], i))
    ranked = [Hit(passage=hits[i].passage, score=scores[i], rank=n + 1) for n, i in enumerate(order)]
    if weight >= 1.0:
        return ranked[:k]
    by_id = {h.passage.id: h.passage for h in hits}
    fused = fuse(ranked, hits, method="rrf", dense_weight=weight)[:k]
    return [Hit(passage=by_id[pid], score=s, rank=n + 1) for n, (pid, s) in enumerate(fused)]
