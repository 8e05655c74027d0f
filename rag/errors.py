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
"""

from __future__ import annotations


class RagError(Exception):
    """Root of every error `rag` raises on purpose."""


class ConfigError(RagError):
    pass


class CorpusError(RagError):
    def __init__(self, message: str, *, source: str | None = None, line: int | None = None):
        where = f"{source}:{line}: " if source and line else f"{source}: " if source else ""
        super().__init__(where + message)
        self.source = source
        self.line = line


class DuplicatePassageError(CorpusError):
    pass


class IndexError_(RagError):  # noqa: N801 - avoid shadowing the builtin IndexError
    pass


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
    pass


class ModelNotFoundError(RagError):
    pass


class PromptError(RagError):
    pass


class GenerationError(RagError):
    pass


def missing_extra(package: str, extra: str) -> BackendUnavailableError:
    """The error for an optional dependency that is not installed."""
    return BackendUnavailableError(
        f"{package} is not installed; install the '{extra}' extra: "
        f"pip install 'rag-pipeline[{extra}]' (or run python -m rag.bootstrap)"
    )
