"""``rag eval`` (runs and comparisons of runs) and ``rag export`` (traces as fine-tuning data)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from rag.cli._common import IndexOpt, Quiet
from rag.errors import ConfigError

Opt = typer.Option


def eval_(
    pipeline: Annotated[list[Path] | None, Opt("--pipeline", "-p", help="pipeline YAML (repeat to compare)")] = None,
    data: Annotated[Path | None, Opt(help="question set file (or BEIR folder)")] = None,
    format: Annotated[str, Opt(help="auto|selfrag|flashrag|squad|nq|beir|arc|alce|tsv")] = "auto",
    index: IndexOpt = None,
    limit: Annotated[int | None, Opt(help="first N questions")] = None,
    task: Annotated[str | None, Opt(
        help="Self-RAG task preset over the pipelines: popqa|triviaqa|pubhealth|arc_challenge|asqa|factscore")] = None,
    out: Annotated[Path, Opt(help="output folder")] = Path("runs/eval"),
    resume: Annotated[bool, Opt(help="keep finished predictions, do the rest")] = False,
    batch_size: Annotated[int, Opt(help="questions per batched pipeline call")] = 16,
    use_ctxs: Annotated[bool, Opt(help="use the data's pre-retrieved 'ctxs' passages")] = False,
    check: Annotated[bool, Opt(help="fail if metrics drift from the pipeline's expected: block")] = False,
    qrels: Annotated[Path | None, Opt(help="graded judgments: BEIR qrels TSV or TREC qrels")] = None,
    ignore_identical_ids: Annotated[bool, Opt(
        help="drop a retrieved passage whose id equals the question id (BEIR: ArguAna, Quora)")] = False,
    judge: Annotated[bool, Opt(
        help="local answer judge: faithfulness and answer relevance from the pipeline's generator")] = False,
    runs: Annotated[list[Path] | None, Opt(
        "--runs", help="compare earlier run folders (repeat) instead of running pipelines")] = None,
    quiet: Quiet = False,
) -> None:
    """Evaluate pipelines on a question set: predictions.jsonl, run.trec, summary.json with paired
    significance tests, report.md/.html. With --runs, compare earlier run folders."""
    from rag.config import DEFAULT_PIPELINE
    from rag.eval.runner import evaluate

    if runs:
        if pipeline or data:
            raise ConfigError("--runs compares finished runs; leave out --pipeline and --data")
        _compare(runs, out)
        return
    if data is None:
        raise ConfigError("rag eval needs --data QUESTIONS (or --runs A --runs B)")
    summary = evaluate(pipeline or [DEFAULT_PIPELINE], data, format=format, index=index, limit=limit, out=out,
                       resume=resume, batch_size=batch_size, use_ctxs=use_ctxs, progress=not quiet,
                       task=task, qrels=qrels, ignore_identical_ids=ignore_identical_ids, judge=judge)
    _print_summary(summary, out, check)


def _compare(runs: list[Path], out: Path) -> None:
    from rag.eval.runner import compare_runs

    for r in compare_runs(runs, out)["comparisons"]:
        significant = ", significant" if r["significant"] else ""
        typer.echo(f"{r['metric']}: {r['a']} {r['mean_a']:.4f} vs {r['b']} {r['mean_b']:.4f} "
                   f"(p={r['p']:.4f}, adjusted {r['p_adjusted']:.4f}{significant})")
    typer.echo(f"report: {out / 'comparison.md'}")


def _print_summary(summary: dict[str, Any], out: Path, check: bool) -> None:
    for p in summary["pipelines"]:
        shown = {k: round(v["mean"], 4) for k, v in p["metrics"].items()}
        typer.echo(f"{p['pipeline']}: {json.dumps(shown)} ({p['seconds_per_question']:.3f} s/question)")
    typer.echo(f"report: {out / 'report.md'}")
    problems = [x for p in summary["pipelines"] for x in p["check"]]
    if check and problems:
        raise ConfigError("metrics drifted from expected: " + "; ".join(problems))


def export(
    predictions: Annotated[Path, typer.Argument(help="an eval predictions.jsonl")],
    to: Annotated[str, Opt(help="interactions | text")] = "interactions",
    out: Annotated[Path | None, Opt(help="output JSONL (default: stdout)")] = None,
) -> None:
    """Export eval traces as Mistral fine-tuning JSONL (question -> user, prediction -> assistant)."""
    from rag.eval.records import read_predictions
    from rag.prompts.interactions import to_interactions, to_text
    from rag.types import ChatMessage

    if to not in ("interactions", "text"):
        raise ConfigError(f"--to must be interactions or text, got {to!r}")
    convert = to_interactions if to == "interactions" else to_text
    text = "".join(json.dumps(convert([ChatMessage(role="user", content=r.question),
                                       ChatMessage(role="assistant", content=r.prediction)]),
                              ensure_ascii=False) + "\n" for r in read_predictions(predictions))
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text, encoding="utf-8")
