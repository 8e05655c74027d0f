"""``rag tune fusion`` and ``rag tune critic``: choose settings on your own questions and write
them into a pipeline file (`rag.config.update_pipeline_file`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from rag.cli._common import IndexOpt
from rag.errors import ConfigError

app = typer.Typer(no_args_is_help=True, help="Choose settings on your own queries.")
Opt = typer.Option
HeldOut = Annotated[float, Opt(min=0.05, max=0.95, help="fraction of questions held out")]
Seed = Annotated[int, Opt(help="seed of the tuning / held-out split")]
Measure = Annotated[str, Opt(help="measure to maximise")]
Limit = Annotated[int | None, Opt(help="first N questions")]
Out = Annotated[Path | None, Opt(help="write the tuned pipeline here (default: the pipeline file)")]


@app.command("fusion")
def fusion(
    pipeline: Annotated[Path, Opt("--pipeline", "-p", help="pipeline YAML to tune")],
    data: Annotated[Path, Opt(help="questions with gold passages (BEIR folder, SQuAD, qrels)")],
    index: IndexOpt = None,
    format: Annotated[str, Opt(help="question-set format (see rag eval)")] = "auto",
    qrels: Annotated[Path | None, Opt(help="graded judgments: BEIR qrels TSV or TREC qrels")] = None,
    limit: Limit = None,
    held_out: HeldOut = 0.5,
    seed: Seed = 0,
    measure: Measure = "ndcg@10",
    out: Out = None,
) -> None:
    """Tune hybrid fusion (weighted RRF or min-max score fusion) on held-out queries and record
    it in the pipeline file (retrieval.mode: hybrid, retrieval.fusion)."""
    from rag.config import load_pipeline_config, update_pipeline_file
    from rag.eval.datasets import load_dataset
    from rag.eval.fusion import tune_on_index

    config = load_pipeline_config(pipeline)
    folder = index or config.index
    if folder is None:
        raise ConfigError(f"{pipeline} names no index; pass --index")
    items = [it for it in load_dataset(data, format, limit=limit, qrels=qrels) if it.gold_ids]
    depth = config.retrieval.fusion.candidates
    result = tune_on_index(folder, items, measure=measure, held_out=held_out, seed=seed, depth=depth)
    fused = {**result["fusion"], "candidates": depth}
    held = ", ".join(f"{k} {v:.4f}" for k, v in result["held_out"].items())
    typer.echo(f"{measure} on {result['held_out_queries']} held-out questions (tuned on {result['tune_queries']}): "
               f"{held}")
    typer.echo(f"chosen: {json.dumps(fused)}")
    note = (f"# rag tune fusion --data {data}: held-out {measure} ({result['held_out_queries']} questions, "
            f"seed {seed}): {held}")
    target = update_pipeline_file(pipeline, "retrieval", {"mode": "hybrid", "fusion": fused}, note, out=out)
    typer.echo(f"written: {target}")


@app.command("query")
def query(
    pipeline: Annotated[Path, Opt("--pipeline", "-p", help="chat or retrieval pipeline YAML to tune")],
    data: Annotated[Path, Opt(help="a conversational folder (conversations.jsonl + qrels.tsv)")],
    index: IndexOpt = None,
    limit: Limit = None,
    held_out: HeldOut = 0.5,
    seed: Seed = 0,
    measure: Measure = "ndcg@10",
    llm: Annotated[bool, Opt(help="also try rewrite and hyde (the generator writes for every turn)")] = False,
    out: Out = None,
) -> None:
    """Tune how follow-up turns are searched (retrieval.query: last_turn, history, and with --llm
    rewrite and hyde) and, when the file has retrieval.rerank, its candidates and weight or no
    reranking, on held-out turns; record the choice in the pipeline file."""
    from rag.config import load_pipeline_config, update_pipeline_file

    config = load_pipeline_config(pipeline)
    if (index or config.index) is None or config.retrieval.mode == "none":
        raise ConfigError(f"{pipeline} names no index or retrieves nothing (mode: none); pass --index")
    if llm and config.kind != "chat":
        raise ConfigError(f"--llm needs a chat pipeline (its generator writes the rewrites); {pipeline} is "
                          f"kind: {config.kind}")
    result = _tune_query(config, data, index, limit=limit, measure=measure, held_out=held_out, seed=seed, llm=llm)
    held = ", ".join(f"{k} {v:.4f}" for k, v in result["held_out"].items())
    typer.echo(f"{measure} on {result['held_out_queries']} held-out turns (tuned on {result['tune_queries']}): {held}")
    chosen = dict(result["query"])
    if config.retrieval.rerank is not None:
        rerank = result["rerank"]
        chosen["rerank"] = None if rerank is None else {**config.retrieval.rerank.model_dump(), **rerank}
    typer.echo(f"chosen: {json.dumps(chosen)} (per-turn gain over last_turn on the tuning turns, less one "
               f"standard error: {result['gain_bound']:+.4f})")
    if result["held_out"]["tuned"] < result["held_out"]["last_turn"]:
        typer.echo("note: the choice loses to last_turn on the held-out turns; consider keeping last_turn", err=True)
    note = (f"# rag tune query --data {data}: held-out {measure} ({result['held_out_queries']} turns, seed {seed}): "
            f"{held}")
    typer.echo(f"written: {update_pipeline_file(pipeline, 'retrieval', chosen, note, out=out)}")


def _tune_query(config: Any, data: Path, index: Path | None, *, llm: bool, limit: int | None,
                **how: Any) -> dict[str, Any]:
    """`rag.eval.query.tune_query` with the pipeline the config names (its generator loaded when
    it writes rewrites or reranks), closed afterwards."""
    from rag.eval.datasets import load_dataset
    from rag.eval.query import tune_query
    from rag.pipeline import BasePipeline, build_pipeline

    pipe = build_pipeline(config, index=index, follow=False)
    assert isinstance(pipe, BasePipeline)
    try:
        if llm or config.retrieval.rerank is not None:
            pipe.load()
        return tune_query(load_dataset(data, limit=limit), pipe, llm=llm, **how)
    finally:
        pipe.close()


@app.command("critic")
def critic(
    run: Annotated[Path, typer.Argument(help="a Self-RAG pipeline's folder of a rag eval run (runs/NAME/PIPELINE)")],
    pipeline: Annotated[Path | None, Opt(
        "--pipeline", "-p", help="write the chosen weights into this pipeline file")] = None,
    metric: Annotated[str, Opt(help="match | match_norm | em | f1")] = "match",
    held_out: HeldOut = 0.5,
    seed: Seed = 0,
    baseline: Annotated[Path | None, Opt(
        help="another pipeline's folder of the same run (e.g. naive RAG), scored on the same splits")] = None,
    screen: Annotated[bool, Opt(
        help="tune the relevance screen of candidates: 1 (w_rel, w_ret) from a run with every candidate")] = False,
) -> None:
    """Calibrate how Self-RAG picks among its candidates (selfrag.w_rel, w_sup, w_use, use_seq,
    w_ret) on a tuning split of an eval run, report the held-out split, record it in a pipeline."""
    from rag.config import update_pipeline_file
    from rag.eval.calibrate import read_candidates, tune
    from rag.eval.records import read_predictions

    result = tune(read_candidates(run), metric=metric, held_out=held_out, seed=seed,
                  baseline=read_predictions(baseline) if baseline else None, screen=screen)
    typer.echo(f"{metric}: {result['tune_questions']} tuning / {result['held_out_questions']} held-out questions")
    for name in ("baseline", "paper", "top_ranked", "tuned", "oracle"):
        if name in result:
            typer.echo(f"  {name:<11} tune {result[name]['tune']:.4f}  held-out {result[name]['held_out']:.4f}")
    typer.echo(f"chosen: {json.dumps(result['weights'])}")
    if pipeline is None:
        return
    note = (f"# rag tune critic {run}: held-out {metric} {result['tuned']['held_out']:.4f} "
            f"({result['held_out_questions']} questions, seed {seed}; paper weights {result['paper']['held_out']:.4f})")
    typer.echo(f"written: {update_pipeline_file(pipeline, 'selfrag', result['weights'], note)}")
