"""Errors raised by `rag`. Every message names the bad value, where it was and the fix.

    RagError
    ├── ConfigError              a recipe / pipeline YAML or an option is invalid
    ├── CorpusError              a corpus file is malformed (carries file and line)
    │   └── DuplicatePassageError
    ├── IndexError_               an index folder is missing, incomplete or incompatible
    │   ├── IndexNotFoundError
    │   ├── IndexCorruptError    a file is damaged, or the manifest no longer matches the files
    │   │   └── CheckpointError  a change's own work folder is inconsistent (removed; run it again)
    │   ├── IndexBusyError       another process is changing the folder (names the holder)
    │   └── IndexMismatchError   the embedder differs from the one the index was built with
    ├── BackendUnavailableError  an optional library is not installed (names the extra)
    ├── ModelNotFoundError       a model id / folder cannot be found offline
    ├── PromptError              a conversation cannot be formatted (bad role, empty turn)
    └── GenerationError          the generator failed or was misconfigured

Each class carries the HTTP status and OpenAI error type the service answers it with
(``http_status``, ``http_type``): the caller's mistakes are 4xx, an index or backend that cannot
serve is 503, a generator that failed is 502; only an unexpected error is 500.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any, ClassVar


class RagError(Exception):
    """Root of every error `rag` raises on purpose."""

    http_status: ClassVar[int] = 500
    http_type: ClassVar[str] = "server_error"


class _ClientError(RagError):
    http_status = 400
    http_type = "invalid_request_error"


class ConfigError(_ClientError):
    pass


class CorpusError(_ClientError):
    def __init__(self, message: str, *, source: str | None = None, line: int | None = None):
        where = f"{source}:{line}: " if source and line else f"{source}: " if source else ""
        super().__init__(where + message)
        self.source = source
        self.line = line


class DuplicatePassageError(CorpusError):
    pass


class IndexError_(RagError):  # noqa: N801 - avoid shadowing the builtin IndexError
    http_status = 503


class IndexNotFoundError(IndexError_):
    pass


class IndexCorruptError(IndexError_):
    """A file of an index folder is damaged (truncated, corrupted, an unfinished checkpoint)."""


class CheckpointError(IndexCorruptError):
    """A build's or change's checkpoints do not add up; its work folder is removed."""


class IndexMismatchError(IndexError_):
    pass


class IndexBusyError(IndexError_):
    """Another writer holds the folder's lock (the message names it)."""


class BackendUnavailableError(RagError):
    http_status = 503


class ModelNotFoundError(RagError):
    http_status = 503


class PromptError(_ClientError):
    pass


class GenerationError(RagError):
    http_status = 502


def missing_extra(package: str, extra: str) -> BackendUnavailableError:
    """The error for an optional dependency that is not installed."""
    return BackendUnavailableError(
        f"{package} is not installed; install the '{extra}' extra: "
        f"pip install 'rag-pipeline[{extra}]' (or run python -m rag.bootstrap)"
    )


def field_path(loc: Iterable[str | int], drop: Collection[str | int] = ()) -> str:
    """A pydantic error location as a field path: ``messages[0].role``, ``rag.top_k``."""
    out = ""
    for part in loc:
        if part in drop:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_message(errors: Iterable[Mapping[str, Any]], *, drop: Collection[str | int] = (),
                       rename: Mapping[str, str] | None = None) -> str:
    """The one wording of pydantic validation errors, wherever they come from (a YAML file, CLI
    options, an HTTP body): ``field 'a.b': <what is wrong> (got <value>)``, joined by ``; ``.
    ``drop``: location parts left out (a union's tag, FastAPI's ``body``); ``rename``: messages
    for error types, with ``{field}`` and ``{input}``."""
    parts = []
    for e in errors:
        where = field_path(e.get("loc", ()), drop) or "(top level)"
        special = (rename or {}).get(str(e.get("type")))
        if special is not None:
            parts.append(special.format(field=where, input=e.get("input")))
            continue
        got = f" (got {e['input']!r})" if e.get("type") != "missing" and "input" in e else ""
        parts.append(f"field '{where}': {e.get('msg', 'invalid')}{got}")
    return "; ".join(parts)
