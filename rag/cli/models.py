"""``rag models prepare`` and ``rag demo`` (the main job on the embedded defaults)."""

from __future__ import annotations

from pathlib import Path

import typer

from rag.cli._common import Quiet, open_pipeline

app = typer.Typer(no_args_is_help=True, help="Packaged and local generator models.")
DEMO_RECIPE = Path("indexes/pydoc.yaml")
DEMO_QUERIES = ["how do I catch an exception and clean up afterwards",
                "what does the with statement do",
                "operator precedence of not and or"]
DEMO_QUESTIONS = ["What does the with statement do?",
                  "Which clause of a try statement runs whether or not an exception occurred?"]


@app.command("prepare")
def prepare(name: str = "smollm2-135m-instruct") -> None:
    """Convert a packaged model to a Hugging Face folder in the cache (once)."""
    from rag.models import prepare_packaged_model

    typer.echo(str(prepare_packaged_model(name)))


def demo(quiet: Quiet = False) -> None:
    """The main job on embedded defaults: index the Python docs topics, search, answer."""
    from rag.config import IndexRecipe, load_recipe
    from rag.index import build_index
    from rag.retriever import load_retriever
    from rag.types import ChatMessage

    recipe = load_recipe(DEMO_RECIPE) if DEMO_RECIPE.exists() else IndexRecipe(
        name="pydoc", corpus="pydoc_data.topics")
    m = build_index(recipe, progress=not quiet)
    typer.echo(f"index {recipe.out_dir()}: {m.passages} passages ({m.embedder_info.name}, {m.factory})")
    retriever = load_retriever(recipe.out_dir(), "hybrid")
    for query, hits in zip(DEMO_QUERIES, retriever.search_batch(DEMO_QUERIES, 3), strict=True):
        typer.echo(f"\n? {query}")
        for h in hits:
            typer.echo(f"  {h.rank}. {h.passage.title} ({h.passage.id}) {h.passage.text[:90].replace(chr(10), ' ')}...")
    typer.echo("\nanswers (the packaged pipeline):")
    with open_pipeline(None, recipe.out_dir()) as pipe:
        answers = pipe.answer_batch([[ChatMessage(role="user", content=q)] for q in DEMO_QUESTIONS])
    for question, answer in zip(DEMO_QUESTIONS, answers, strict=True):
        typer.echo(f"\nQ: {question}\nA: {answer.text}")
        typer.echo("   sources: " + ", ".join(c.id for c in answer.citations))
