"""What the command modules share: option types, output helpers and the pipeline a YAML names."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated

import typer

from rag.errors import ConfigError
from rag.pipeline import Pipeline
from rag.types import Hit

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]
Wait = Annotated[float, typer.Option(
    "--wait", help="seconds to wait while another process changes the index (default: fail at once; -1: no limit)")]
Yes = Annotated[bool, typer.Option("--yes", help="go ahead even if more than half of the passages would go")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="print what would change (JSON) and change nothing")]
CorpusFormat = Annotated[str, typer.Option("--format", help="auto|jsonl|flashrag|dpr|beir|dir|pydoc")]
PipelineOpt = Annotated[Path | None, typer.Option(
    "--pipeline", "-p", help="pipeline YAML (default: the packaged one, SmolLM2 on the CPU)")]
IndexOpt = Annotated[Path | None, typer.Option("--index", help="index folder (overrides the pipeline's)")]


def echo_json(data: object) -> None:
    typer.echo(json.dumps(data, ensure_ascii=False, indent=2))


def echo_hits(hits: Sequence[Hit]) -> None:
    for h in hits:
        typer.echo(f"{h.rank:>2}. [{h.score:.4f}] {h.passage.title} ({h.passage.id})")
        typer.echo("    " + h.passage.text[:300].replace("\n", " "))


def check_text(what: str, text: str) -> None:
    """Arguments that are not valid UTF-8 reach Python as lone surrogates: a one-line error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(f"{what} is not valid UTF-8 (byte {ord(text[e.start]) - 0xDC00:#04x} at character "
                          f"{e.start}); pass UTF-8 text") from None


@contextlib.contextmanager
def open_pipeline(pipeline: Path | None, index: Path | None) -> Iterator[Pipeline]:
    """The pipeline a YAML names (default: the packaged one); its engine (threads, processes)
    is closed on the way out."""
    from rag.config import DEFAULT_PIPELINE, load_pipeline_config
    from rag.pipeline import build_pipeline

    pipe = build_pipeline(load_pipeline_config(pipeline or DEFAULT_PIPELINE), index=index)
    try:
        yield pipe
    finally:
        pipe.close()


def pipeline_files(paths: Sequence[Path]) -> list[Path]:
    """Pipeline YAMLs: files as given, a folder's ``*.yaml``/``*.yml`` in name order."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
            if not found:
                raise ConfigError(f"{path} holds no pipeline files (*.yaml)")
            files += found
        else:
            files.append(path)
    return files


@contextlib.contextmanager
def open_pipelines(paths: Sequence[Path], index: Path | None) -> Iterator[list[Pipeline]]:
    """The pipelines the YAMLs (or folders of them) name, default: the packaged one; those with
    equal generator settings share one engine; all are closed on the way out."""
    from rag.config import DEFAULT_PIPELINE, load_pipeline_config
    from rag.pipeline import build_pipelines

    pipes = build_pipelines([load_pipeline_config(f) for f in pipeline_files(paths or [DEFAULT_PIPELINE])], index=index)
    try:
        yield pipes
    finally:
        for p in pipes:
            p.close()
