"""OpenAI-compatible HTTP service over one or several pipelines (FastAPI), laid out after vLLM's
``entrypoints/openai``:

- `rag.server.app`: assembles the app (limits, middleware, errors, routers); `rag.server.run`
  serves it on uvicorn; `rag.server.middleware`: API key, body size, security headers, metrics.
- `rag.server.state`: the served pipelines by model name (a request's ``model`` picks one).
- `rag.server.protocol`: strict request and response models (every field honoured, accepted as
  harmless, or refused), `ServiceLimits`; `rag.server.sampling`: request fields to settings.
- `rag.server.admission`: the in-flight bound, per-request timeouts, disconnects, shutdown.
- `rag.server.errors`: one handler; each error class answers with its own status.
- `rag.server.routers`: ``chat`` (``POST /v1/chat/completions``, JSON or SSE), ``completions``
  (``POST /v1/completions``: the model itself, echo, list prompts), ``embeddings``
  (``POST /v1/embeddings``), ``tokens`` (``POST /tokenize``, ``/detokenize``), ``retrieve``
  (``POST /v1/retrieve``), ``models``
  (``GET /v1/models``, ``GET /v1/info``), ``runs`` (the playground ``GET /`` and eval reports
  under ``GET /v1/runs``), ``health`` (``GET /health``, ``GET /metrics``).

Generation runs on each pipeline's engine (vLLM's async engine batches concurrent requests
continuously; the transformers backend batches them on its worker). Streaming and non-streaming
requests share one admission bound (``max_inflight``; past it 429 with ``Retry-After``) and one
per-request timeout (504 for JSON; an error event, then ``[DONE]``, for SSE). A client that goes
away aborts its generation; so does a server shutdown (503 / an error event). Responses carry an
extension field ``rag`` (citations; Self-RAG scores, the chosen candidate and the retrieval
decision); requests may carry ``rag: {"top_k": N, "include_trace": bool, "include_sources":
bool}`` (sources: the retrieved passages with their text, also sent in a chunk of their own as
soon as they are known when streaming). Message ``content`` may be a string or a list of text
parts.
"""

from __future__ import annotations

from rag.errors import missing_extra

try:
    import fastapi  # noqa: F401
    import sse_starlette  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    raise missing_extra("fastapi and sse-starlette", "serve") from None

from rag.server.app import create_app  # noqa: E402
from rag.server.protocol import ServiceLimits  # noqa: E402
from rag.server.run import serve  # noqa: E402

__all__ = ["ServiceLimits", "create_app", "serve"]
