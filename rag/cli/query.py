"""``rag search``, ``rag ask`` and ``rag chat``: questions against an index or a pipeline."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from rag.cli._common import IndexOpt, PipelineOpt, check_text, echo_hits, echo_json, open_pipeline
from rag.errors import ConfigError
from rag.pipeline import Pipeline
from rag.types import ChatMessage, Hit, SourcesEvent, TextEvent


def _parse_filter(items: list[str] | None) -> dict[str, Any] | None:
    if not items:
        return None
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--filter {item!r}: use KEY=VALUE, e.g. --filter source=faq.md")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def search(
    folder: Path,
    query: str,
    k: Annotated[int, typer.Option("-k", "--top-k", help="passages to return")] = 5,
    mode: Annotated[str, typer.Option(help="dense|bm25|hybrid")] = "dense",
    filter: Annotated[list[str] | None, typer.Option(help="KEY=VALUE metadata filter")] = None,
    nprobe: Annotated[int | None, typer.Option(help="IVF lists to visit")] = None,
    ef_search: Annotated[int | None, typer.Option(help="HNSW search breadth")] = None,
    precision: Annotated[str | None, typer.Option(help="query encoder precision (default: the index's)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Search an index and print ranked passages."""
    from rag.retriever import load_retriever

    check_text("the query", query)
    extra = {k2: v for k2, v in {"nprobe": nprobe, "ef_search": ef_search, "precision": precision}.items() if v}
    retriever = load_retriever(folder, mode, **extra)  # type: ignore[arg-type]
    hits = retriever.search(query, k, filter=_parse_filter(filter))
    if as_json:
        echo_json([h.to_json() for h in hits])
    else:
        echo_hits(hits)


def ask(
    question: str,
    pipeline: PipelineOpt = None,
    index: IndexOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    trace: Annotated[bool, typer.Option(help="include the prompt and timings in --json")] = False,
) -> None:
    """Answer one question with a pipeline; prints the answer and its citations (a
    retrieval-only pipeline prints its ranked passages). To ask many questions without loading
    the models each time, use rag chat or rag serve."""
    check_text("the question", question)
    with open_pipeline(pipeline, index) as pipe:
        answer = pipe.ask(question)
        generates = pipe.info().generator is not None
    if as_json:
        echo_json(answer.to_json(include_trace=trace))
    elif not generates:
        echo_hits(answer.hits)
    else:
        typer.echo(answer.text)
        for i, c in enumerate(answer.citations, 1):
            typer.echo(f"  [{i}] {c.title} ({c.id}) score={c.score:.4f}")


def chat(
    pipeline: PipelineOpt = None,
    index: IndexOpt = None,
    save: Annotated[Path | None, typer.Option(help="append the chat as interactions JSONL")] = None,
    resume: Annotated[Path | None, typer.Option(help="continue the last chat in an interactions JSONL")] = None,
) -> None:
    """Interactive multi-turn chat with streaming; the models stay loaded between turns.
    /sources shows the last turn's passages, /reset clears the history, /quit (or Ctrl-D) leaves."""
    from rag.prompts.interactions import read_interactions

    history: list[ChatMessage] = []
    if resume is not None:
        for convo in read_interactions(resume):
            history = convo
    with open_pipeline(pipeline, index) as pipe:
        try:
            _Chat(pipe, history).run()
        finally:
            if save is not None and history:
                _save(save, history)


def _save(path: Path, history: list[ChatMessage]) -> None:
    from rag.prompts.interactions import to_interactions

    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(to_interactions(history), ensure_ascii=False) + "\n")


class _Chat:
    """The chat loop: reads lines, streams answers; ``history`` is the caller's list."""

    def __init__(self, pipe: Pipeline, history: list[ChatMessage]):
        self.pipe, self.history, self.hits = pipe, history, list[Hit]()

    def run(self) -> None:
        typer.echo("rag chat - /sources, /reset, /quit", err=True)
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                typer.echo("", err=True)
                return
            if line in ("/quit", "/exit"):
                return
            if line in ("/reset", "/sources"):
                self.command(line)
            elif line:
                self.turn(line)

    def command(self, line: str) -> None:
        if line == "/reset":
            self.history.clear()
            self.hits = []
            return
        for h in self.hits:
            typer.echo(f"  [{h.rank}] {h.passage.title} ({h.passage.id}) {h.score:.4f}: {h.passage.text[:160]}")
        if not self.hits:
            typer.echo("  (no passages yet)")

    def turn(self, line: str) -> None:
        self.history.append(ChatMessage(role="user", content=line))
        text = asyncio.run(self._stream())
        self.history.append(ChatMessage(role="assistant", content=text))

    async def _stream(self) -> str:
        text = ""
        typer.echo("rag> ", nl=False)
        async for event in self.pipe.astream(list(self.history)):
            if isinstance(event, SourcesEvent):
                self.hits = event.hits
            elif isinstance(event, TextEvent):
                text += event.text
                typer.echo(event.text, nl=False)
        typer.echo("")
        return text
