"""The ``rag`` command line. Every command is a thin call into the library.

Errors print one line on stderr and exit 1 (a traceback with ``--debug``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from rag.errors import ConfigError, RagError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Retrieval-augmented generation: index, search, ask, chat, serve, eval.")
index_app = typer.Typer(no_args_is_help=True, help="Build and inspect indexes.")
app.add_typer(index_app, name="index")

DEMO_RECIPE = Path("indexes/pydoc.yaml")
DEMO_QUERIES = ["how do I catch an exception and clean up afterwards",
                "what does the with statement do",
                "operator precedence of not and or"]
DEMO_PIPELINE = Path("pipelines/default.yaml")
DEMO_QUESTIONS = ["What does the with statement do?",
                  "Which clause of a try statement runs whether or not an exception occurred?"]

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]
Wait = Annotated[float, typer.Option(
    "--wait", help="seconds to wait while another process changes the index (default: fail at once; -1: no limit)")]
Yes = Annotated[bool, typer.Option("--yes", help="go ahead even if more than half of the passages would go")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="print what would change (JSON) and change nothing")]


RAY_LOCAL = "local"  # `--ray` given without an address: start a cluster for this build


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, ensure_ascii=False, indent=2))


@index_app.command("build")
def index_build(
    recipe: Annotated[Optional[Path], typer.Argument(help="index recipe YAML (indexes/*.yaml)")] = None,
    corpus: Annotated[Optional[str], typer.Option(help="corpus file/folder, or pydoc_data.topics")] = None,
    format: Annotated[str, typer.Option(help="auto|jsonl|flashrag|dpr|beir|dir|pydoc")] = "auto",
    out: Annotated[Optional[Path], typer.Option(help="output folder")] = None,
    embedder: Annotated[Optional[str], typer.Option(help="encoder name or folder")] = None,
    factory: Annotated[Optional[str], typer.Option(help="FAISS factory string")] = None,
    metric: Annotated[Optional[str], typer.Option(help="ip or l2")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="passages per encode/checkpoint step")] = None,
    skip_bad_lines: Annotated[bool, typer.Option(help="record malformed lines instead of failing")] = False,
    device: Annotated[Optional[str], typer.Option(help="auto|cpu|gpu")] = None,
    precision: Annotated[Optional[str], typer.Option(
        help="encoder precision: auto|fp32|bf16|fp16|int8 (int8 needs the int8 extra)")] = None,
    force: Annotated[bool, typer.Option(help="rebuild even if up to date")] = False,
    prompts: Annotated[Optional[str], typer.Option(
        help="encoder prompts: model (declared by the encoder; default), none, e5, bge, gte-instruct, "
             "instructor")] = None,
    ray: Annotated[Optional[str], typer.Option(
        "--ray", metavar="[ADDRESS]",
        help="encode on a Ray cluster: no value starts a local one; 'auto' joins the cluster "
             "of 'ray start' on this machine; HOST:PORT joins that one (needs the ray extra)")] = None,
    ray_actors: Annotated[Optional[int], typer.Option(min=1, help="embedder actors (default: one per GPU or per "
                                                           "--ray-cpus-per-actor CPUs)")] = None,
    ray_cpus_per_actor: Annotated[int, typer.Option(min=1, help="CPU threads per actor on CPU clusters")] = 1,
    ray_window: Annotated[Optional[int], typer.Option(min=1, help="passages per Ray task and checkpoint "
                                                           "(default: --batch-size)")] = None,
    quiet: Quiet = False,
    wait: Wait = 0.0,
) -> None:
    """Build an index from a corpus (or a recipe); resumes an interrupted build."""
    from pydantic import ValidationError

    from rag.config import IndexRecipe, load_recipe, validation_message
    from rag.index import build_index, folder_size

    overrides = {k: v for k, v in {
        "corpus": corpus, "out": str(out) if out else None, "embedder": embedder,
        "factory": factory, "metric": metric, "batch_size": batch_size, "device": device,
        "precision": precision, "prompts": prompts,
    }.items() if v is not None}
    if format != "auto":
        overrides["format"] = format
    if skip_bad_lines:
        overrides["skip_bad_lines"] = True
    if recipe is not None:
        base = load_recipe(recipe).model_dump()
    elif corpus is None:
        raise ConfigError("give a recipe (rag index build indexes/NAME.yaml) or --corpus PATH")
    else:
        name = (out or Path(corpus.rstrip("/"))).name.split(".")[0] or "index"
        base = {"name": name}
    try:
        r = IndexRecipe(**{**base, **overrides})
    except ValidationError as e:
        raise ConfigError(validation_message(recipe or "options", e)) from None
    ray_opts = None
    if ray is not None:
        from rag.index.ray import RayOptions

        ray_opts = RayOptions(address=None if ray == RAY_LOCAL else ray, actors=ray_actors,
                              cpus_per_actor=ray_cpus_per_actor, window=ray_window)
    m = build_index(r, progress=not quiet, force=force, ray=ray_opts, wait=wait)
    _echo_json({"index": str(r.out_dir()), "passages": m.passages, "factory": m.factory,
                "embedder": m.embedder["name"], "build_seconds": m.build_seconds,
                "bytes": folder_size(r.out_dir())})


@index_app.command("info")
def index_info(folder: Path) -> None:
    """Print an index's manifest, counts and size on disk (JSON)."""
    from rag.index import REPORT_FILE, folder_size, read_manifest

    m = read_manifest(folder)
    report = folder / REPORT_FILE
    try:
        read = json.loads(report.read_text(encoding="utf-8")) if report.exists() else None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{report}: not valid JSON ({e}); run rag index verify {folder}") from None
    _echo_json({**m.model_dump(), "bytes": folder_size(folder), "report": read})


CorpusFormat = Annotated[str, typer.Option("--format", help="auto|jsonl|flashrag|dpr|beir|dir|pydoc")]


def _corpus_change(mode: str, folder: Path, corpus: str, format: str, batch_size: int,
                   skip_bad_lines: bool, quiet: bool, wait: float) -> None:
    from rag.index import upsert

    m = upsert(folder, corpus, format=format, batch_size=batch_size, skip_bad_lines=skip_bad_lines,
               progress=not quiet, mode=mode, wait=wait)  # type: ignore[arg-type]
    _echo_json({"index": str(folder), "passages": m.passages, "change": m.history[-1] if m.history else None})


@index_app.command("add")
def index_add(folder: Path, corpus: Annotated[str, typer.Option(help="corpus to append (ids must be new)")],
              format: CorpusFormat = "auto", batch_size: int = 256, skip_bad_lines: bool = False,
              quiet: Quiet = False, wait: Wait = 0.0) -> None:
    """Append passages to an existing index without rebuilding it."""
    _corpus_change("add", folder, corpus, format, batch_size, skip_bad_lines, quiet, wait)


@index_app.command("upsert")
def index_upsert(folder: Path, corpus: Annotated[str, typer.Option(
                     help="corpus whose passages are added, or replace the stored ones with their ids")],
                 format: CorpusFormat = "auto", batch_size: int = 256, skip_bad_lines: bool = False,
                 quiet: Quiet = False, wait: Wait = 0.0) -> None:
    """Add new passages and replace changed ones (only those are re-encoded); resumable."""
    _corpus_change("upsert", folder, corpus, format, batch_size, skip_bad_lines, quiet, wait)


@index_app.command("delete")
def index_delete(
    folder: Path,
    ids: Annotated[Optional[list[str]], typer.Option("--ids", help="passage ids (repeat)")] = None,
    ids_file: Annotated[Optional[Path], typer.Option(help="a file of passage ids, one per line")] = None,
    source: Annotated[Optional[list[str]], typer.Option(
        help="delete every passage read from this corpus file (or directory), in any spelling; repeat")] = None,
    dry_run: DryRun = False, yes: Yes = False, wait: Wait = 0.0,
) -> None:
    """Delete passages: they never come back from any search mode and their text leaves the store."""
    from rag.index import delete, plan_delete, read_manifest

    wanted = list(ids or [])
    if ids_file is not None:
        if not ids_file.is_file():
            raise ConfigError(f"--ids-file {ids_file}: no such file")
        wanted += [line.strip() for line in ids_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if dry_run:
        plan = plan_delete(folder, wanted, sources=source or [])
        _echo_json({"index": str(folder), "dry_run": True, "deleted": plan.removed, "passages": plan.stored,
                    "ids": plan.removed_ids})
        return
    before = read_manifest(folder).passages
    m = delete(folder, wanted, sources=source or [], yes=yes, wait=wait)
    _echo_json({"index": str(folder), "deleted": before - m.passages, "passages": m.passages,
                "deleted_rows": m.deleted, "version": m.version})


@index_app.command("sync")
def index_sync(folder: Path, quiet: Quiet = False, dry_run: DryRun = False, yes: Yes = False,
               wait: Wait = 0.0) -> None:
    """Re-read the corpora named in the manifest (by absolute path) and apply the difference
    (added, changed, removed records and files)."""
    from rag.index import plan_sync, read_manifest, sync

    if dry_run:
        _echo_json({"index": str(folder), "dry_run": True, "changes": [
            {**p.model_dump(exclude={"removed_ids"}), "removed_ids": p.removed_ids[:100]} for p in plan_sync(folder)]})
        return
    n = len(read_manifest(folder).history)
    m = sync(folder, progress=not quiet, yes=yes, wait=wait)
    _echo_json({"index": str(folder), "passages": m.passages, "version": m.version, "changes": m.history[n:]})


@index_app.command("compact")
def index_compact(folder: Path, wait: Wait = 0.0) -> None:
    """Drop deleted passages' vectors from the FAISS structure (no re-encoding)."""
    from rag.index import compact, folder_size

    before = folder_size(folder)
    m = compact(folder, wait=wait)
    _echo_json({"index": str(folder), "passages": m.passages, "bytes_before": before, "bytes": folder_size(folder)})


@index_app.command("import")
def index_import(
    index_file: Annotated[Path, typer.Argument(help="an existing FAISS index file (e.g. FlashRAG's e5_Flat.index)")],
    corpus: Annotated[str, typer.Option(help="its passages in row order (wiki18_100w.jsonl, psgs_w100.tsv)")],
    out: Annotated[Path, typer.Option(help="the rag index folder to write")],
    embedder: Annotated[str, typer.Option(help="the encoder the vectors were made with (queries use it)")],
    format: CorpusFormat = "auto",
    prompts: Annotated[str, typer.Option(help="model|none|e5|bge|gte-instruct|instructor")] = "model",
    normalize: Annotated[bool, typer.Option(help="the vectors are unit length (cosine)")] = True,
    check: Annotated[bool, typer.Option(help="re-encode a sample and compare with the stored vectors")] = True,
) -> None:
    """Wrap an existing FAISS index and its corpus into an index folder, without re-encoding."""
    from rag.index import folder_size, import_index

    m = import_index(index_file, corpus, out, embedder=embedder, format=format, prompts=prompts,
                     normalize=normalize, check=check)
    _echo_json({"index": str(out), "passages": m.passages, "factory": m.factory, "metric": m.metric,
                "check": m.history[-1], "bytes": folder_size(out)})


@index_app.command("verify")
def index_verify(folder: Path) -> None:
    """Check every file of an index folder against the sizes and sha256 its manifest recorded."""
    from rag.index import verify

    problems = verify(folder)
    for line in problems:
        typer.echo(line)
    if problems:
        typer.echo(f"{folder}: damaged; rebuild it (rag index build ... --out {folder} --force) or restore a copy")
        raise typer.Exit(1)
    typer.echo(f"{folder}: intact")
    work = folder / ".work"
    for left in sorted(work.iterdir()) if work.is_dir() else []:
        typer.echo(f"note: an interrupted change left {left}; the same command again finishes it "
                   "(any other change removes it)")


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


@app.command()
def search(
    folder: Path,
    query: str,
    k: Annotated[int, typer.Option("-k", "--top-k", help="passages to return")] = 5,
    mode: Annotated[str, typer.Option(help="dense|bm25|hybrid")] = "dense",
    filter: Annotated[Optional[list[str]], typer.Option(help="KEY=VALUE metadata filter")] = None,
    nprobe: Annotated[Optional[int], typer.Option(help="IVF lists to visit")] = None,
    ef_search: Annotated[Optional[int], typer.Option(help="HNSW search breadth")] = None,
    precision: Annotated[Optional[str], typer.Option(help="query encoder precision (default: the index's)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Search an index and print ranked passages."""
    from rag.retriever import load_retriever

    _check_text("the query", query)
    extra = {k2: v for k2, v in {"nprobe": nprobe, "ef_search": ef_search,
                                 "precision": precision}.items() if v}
    retriever = load_retriever(folder, mode, **extra)  # type: ignore[arg-type]
    hits = retriever.search(query, k, filter=_parse_filter(filter))
    if as_json:
        _echo_json([h.to_json() for h in hits])
        return
    _echo_hits(hits)


def _check_text(what: str, text: str) -> None:
    """Arguments that are not valid UTF-8 reach Python as lone surrogates: a one-line error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(f"{what} is not valid UTF-8 (byte {ord(text[e.start]) - 0xDC00:#04x} at character "
                          f"{e.start}); pass UTF-8 text") from None


def _echo_hits(hits: Any) -> None:
    for h in hits:
        typer.echo(f"{h.rank:>2}. [{h.score:.4f}] {h.passage.title} ({h.passage.id})")
        typer.echo("    " + h.passage.text[:300].replace("\n", " "))


@contextlib.contextmanager
def _pipeline(pipeline: Path, index: Path | None) -> Iterator[Any]:
    """The pipeline a YAML names; its engine (threads, processes) is closed on the way out."""
    from rag.config import load_pipeline_config
    from rag.pipeline import build_pipeline

    pipe = build_pipeline(load_pipeline_config(pipeline), index=index)
    try:
        yield pipe
    finally:
        pipe.close()


PipelineOpt = Annotated[Path, typer.Option("--pipeline", "-p", help="pipeline YAML (pipelines/*.yaml)")]
IndexOpt = Annotated[Optional[Path], typer.Option("--index", help="index folder (overrides the pipeline's)")]


@app.command()
def ask(
    question: str,
    pipeline: PipelineOpt = Path("pipelines/default.yaml"),
    index: IndexOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    trace: Annotated[bool, typer.Option(help="include the prompt and timings in --json")] = False,
) -> None:
    """Answer one question with a pipeline; prints the answer and its citations (a
    retrieval-only pipeline prints its ranked passages)."""
    _check_text("the question", question)
    with _pipeline(pipeline, index) as pipe:
        answer = pipe.ask(question)
    if as_json:
        _echo_json(answer.to_json(include_trace=trace))
    elif pipe.generator is None:
        _echo_hits(answer.hits)
    else:
        typer.echo(answer.text)
        for i, c in enumerate(answer.citations, 1):
            typer.echo(f"  [{i}] {c.title} ({c.id}) score={c.score:.4f}")


@app.command()
def chat(
    pipeline: PipelineOpt = Path("pipelines/default.yaml"),
    index: IndexOpt = None,
    save: Annotated[Optional[Path], typer.Option(help="append the chat as interactions JSONL")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="continue the last chat in an interactions JSONL")] = None,
) -> None:
    """Interactive multi-turn chat with streaming. /sources shows the last turn's passages,
    /reset clears the history, /quit (or Ctrl-D) leaves."""

    with _pipeline(pipeline, index) as pipe:
        _chat_loop(pipe, save, resume)


def _turn(pipe: Any, history: list[Any]) -> tuple[list[Any], str]:
    """Stream one answer to the terminal; returns its sources and text."""
    from rag.types import SourcesEvent, TextEvent

    async def run() -> tuple[list[Any], str]:
        hits: list[Any] = []
        text = ""
        typer.echo("rag> ", nl=False)
        async for event in pipe.astream(history):
            if isinstance(event, SourcesEvent):
                hits = event.hits
            elif isinstance(event, TextEvent):
                text += event.text
                typer.echo(event.text, nl=False)
        typer.echo("")
        return hits, text

    return asyncio.run(run())


def _chat_loop(pipe: Any, save: Path | None, resume: Path | None) -> None:
    from rag.prompts.interactions import read_interactions, to_interactions
    from rag.types import ChatMessage

    history: list[ChatMessage] = []
    if resume is not None:
        for convo in read_interactions(resume):
            history = convo
    if save is not None:
        import atexit

        def _save() -> None:
            if history:
                with save.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(to_interactions(history), ensure_ascii=False) + "\n")

        atexit.register(_save)
    last_hits: list[Any] = []
    typer.echo("rag chat - /sources, /reset, /quit", err=True)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            typer.echo("", err=True)
            return
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            history, last_hits = [], []
            continue
        if line == "/sources":
            for h in last_hits:
                typer.echo(f"  [{h.rank}] {h.passage.title} ({h.passage.id}) {h.score:.4f}: "
                           f"{h.passage.text[:160]}")
            if not last_hits:
                typer.echo("  (no passages yet)")
            continue
        history.append(ChatMessage(role="user", content=line))
        last_hits, text = _turn(pipe, history)
        history.append(ChatMessage(role="assistant", content=text))


@app.command()
def serve(
    pipeline: PipelineOpt = Path("pipelines/default.yaml"),
    index: IndexOpt = None,
    host: Annotated[str, typer.Option(help="bind address (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    max_inflight: Annotated[int, typer.Option(help="requests in flight (streams too) before 429")] = 64,
    timeout: Annotated[float, typer.Option(help="per-request timeout in seconds")] = 120.0,
    runs: Annotated[Optional[Path], typer.Option(
        help="folder of rag eval runs the playground page may open", exists=True, file_okay=False)] = None,
) -> None:
    """Serve a pipeline over an OpenAI-compatible HTTP API and a playground page at /
    (RAG_API_KEY enables auth)."""
    from rag.service import ServiceLimits
    from rag.service import serve as run_server
    from rag.settings import get_settings

    with _pipeline(pipeline, index) as pipe:
        typer.echo(f"serving {pipe.config.name} on http://{host}:{port}/v1 (playground: "
                   f"http://{host}:{port}/)", err=True)
        run_server(pipe, host=host, port=port, api_key=get_settings().api_key,
                   limits=ServiceLimits(max_inflight=max_inflight, timeout_s=timeout), runs_dir=runs)


@app.command("eval")
def eval_(
    pipeline: Annotated[Optional[list[Path]], typer.Option(
        "--pipeline", "-p", help="pipeline YAML (repeat to compare)")] = None,
    data: Annotated[Optional[Path], typer.Option(help="question set file (or BEIR folder)")] = None,
    format: Annotated[str, typer.Option(help="auto|selfrag|flashrag|squad|nq|beir|arc|alce|tsv")] = "auto",
    index: IndexOpt = None,
    limit: Annotated[Optional[int], typer.Option(help="first N questions")] = None,
    task: Annotated[Optional[str], typer.Option(
        help="Self-RAG task preset over the pipelines: popqa|triviaqa|pubhealth|arc_challenge|asqa|factscore")] = None,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("runs/eval"),
    resume: Annotated[bool, typer.Option(help="keep finished predictions, do the rest")] = False,
    batch_size: Annotated[int, typer.Option(help="questions per batched pipeline call")] = 16,
    use_ctxs: Annotated[bool, typer.Option(help="use the data's pre-retrieved 'ctxs' passages")] = False,
    check: Annotated[bool, typer.Option(help="fail if metrics drift from the pipeline's expected: block")] = False,
    qrels: Annotated[Optional[Path], typer.Option(help="graded judgments: BEIR qrels TSV or TREC qrels")] = None,
    ignore_identical_ids: Annotated[bool, typer.Option(
        help="drop a retrieved passage whose id equals the question id (BEIR: ArguAna, Quora)")] = False,
    judge: Annotated[bool, typer.Option(
        help="local answer judge: faithfulness and answer relevance from the pipeline's generator")] = False,
    runs: Annotated[Optional[list[Path]], typer.Option(
        "--runs", help="compare earlier run folders (repeat) instead of running pipelines")] = None,
    quiet: Quiet = False,
) -> None:
    """Evaluate pipelines on a question set: predictions.jsonl, run.trec, summary.json with paired
    significance tests, report.md/.html. With --runs, compare earlier run folders."""
    from rag.eval.runner import compare_runs, evaluate

    if runs:
        if pipeline or data:
            raise ConfigError("--runs compares finished runs; leave out --pipeline and --data")
        result = compare_runs(runs, out)
        for r in result["comparisons"]:
            typer.echo(f"{r['metric']}: {r['a']} {r['mean_a']:.4f} vs {r['b']} {r['mean_b']:.4f} "
                       f"(p={r['p']:.4f}, adjusted {r['p_adjusted']:.4f}{', significant' if r['significant'] else ''})")
        typer.echo(f"report: {out / 'comparison.md'}")
        return
    if not pipeline or data is None:
        raise ConfigError("rag eval needs --pipeline and --data (or --runs A --runs B)")
    summary = evaluate(pipeline, data, format=format, index=index, limit=limit, out=out,
                       resume=resume, batch_size=batch_size, use_ctxs=use_ctxs, progress=not quiet,
                       task=task, qrels=qrels, ignore_identical_ids=ignore_identical_ids, judge=judge)
    for p in summary["pipelines"]:
        shown = {k: round(v["mean"], 4) for k, v in p["metrics"].items()}
        typer.echo(f"{p['pipeline']}: {json.dumps(shown)} ({p['seconds_per_question']:.3f} s/question)")
    typer.echo(f"report: {out / 'report.md'}")
    problems = [x for p in summary["pipelines"] for x in p["check"]]
    if check and problems:
        raise ConfigError("metrics drifted from expected: " + "; ".join(problems))


@app.command()
def export(
    predictions: Annotated[Path, typer.Argument(help="an eval predictions.jsonl")],
    to: Annotated[str, typer.Option(help="interactions | text")] = "interactions",
    out: Annotated[Optional[Path], typer.Option(help="output JSONL (default: stdout)")] = None,
) -> None:
    """Export eval traces as Mistral fine-tuning JSONL (question -> user, prediction -> assistant)."""
    from rag.corpus import json_lines
    from rag.prompts.interactions import to_interactions, to_text
    from rag.types import ChatMessage

    if to not in ("interactions", "text"):
        raise ConfigError(f"--to must be interactions or text, got {to!r}")
    convert = to_interactions if to == "interactions" else to_text
    lines = []
    for lineno, rec in json_lines(predictions):
        if isinstance(rec, RagError):
            raise rec
        if "question" not in rec or "prediction" not in rec:
            raise ConfigError(f"{predictions}:{lineno}: not an eval record (needs question, prediction)")
        lines.append(json.dumps(convert([ChatMessage(role="user", content=rec["question"]),
                                         ChatMessage(role="assistant", content=rec["prediction"])]),
                                ensure_ascii=False))
    text = "".join(line + "\n" for line in lines)
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text, encoding="utf-8")


tune_app = typer.Typer(no_args_is_help=True, help="Choose settings on your own queries.")
app.add_typer(tune_app, name="tune")


@tune_app.command("fusion")
def tune_fusion(
    pipeline: PipelineOpt,
    data: Annotated[Path, typer.Option(help="questions with gold passages (BEIR folder, SQuAD, qrels)")],
    index: IndexOpt = None,
    format: Annotated[str, typer.Option(help="question-set format (see rag eval)")] = "auto",
    qrels: Annotated[Optional[Path], typer.Option(help="graded judgments: BEIR qrels TSV or TREC qrels")] = None,
    limit: Annotated[Optional[int], typer.Option(help="first N questions")] = None,
    held_out: Annotated[float, typer.Option(min=0.05, max=0.95, help="fraction of questions held out")] = 0.5,
    seed: Annotated[int, typer.Option(help="seed of the tuning / held-out split")] = 0,
    measure: Annotated[str, typer.Option(help="measure to maximise")] = "ndcg@10",
    out: Annotated[Optional[Path], typer.Option(
        help="write the tuned pipeline here (default: the pipeline file)")] = None,
) -> None:
    """Tune hybrid fusion (weighted RRF or min-max score fusion) on held-out queries and record
    it in the pipeline file (retrieval.mode: hybrid, retrieval.fusion)."""
    import yaml

    from rag.config import load_pipeline_config, load_yaml, pipeline_config
    from rag.eval.datasets import load_dataset
    from rag.eval.fusion import tune
    from rag.retriever import BM25Retriever, DenseRetriever

    config = load_pipeline_config(pipeline)
    folder = index or config.index
    if folder is None:
        raise ConfigError(f"{pipeline} names no index; pass --index")
    items = [it for it in load_dataset(data, format, limit=limit, qrels=qrels) if it.gold_ids]
    depth = config.retrieval.fusion.candidates
    queries = [it.question for it in items]
    dense_hits = DenseRetriever.from_folder(folder).search_batch(queries, depth)
    dense = dict(zip([it.id for it in items], dense_hits, strict=True))
    sparse = dict(zip([it.id for it in items], BM25Retriever(folder).search_batch(queries, depth), strict=True))
    result = tune(items, dense, sparse, measure=measure, held_out=held_out, seed=seed, depth=depth)
    fusion = {**result["fusion"], "candidates": depth}
    typer.echo(f"{measure} on {result['held_out_queries']} held-out questions "
               f"(tuned on {result['tune_queries']}): " + ", ".join(
                   f"{k} {v:.4f}" for k, v in result["held_out"].items()))
    typer.echo(f"chosen: {json.dumps(fusion)}")
    raw = load_yaml(pipeline)
    raw["retrieval"] = {**raw.get("retrieval", {}), "mode": "hybrid", "fusion": fusion}
    pipeline_config(pipeline, **raw)  # still a valid pipeline
    target = out or pipeline
    header = [line for line in pipeline.read_text(encoding="utf-8").splitlines()
              if line.startswith("#") and not line.startswith("# rag tune fusion")]
    held = ", ".join(f"{k} {v:.4f}" for k, v in result["held_out"].items())
    header.append(f"# rag tune fusion --data {data}: held-out {measure} ({result['held_out_queries']} "
                  f"questions, seed {seed}): {held}")
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text("\n".join(header) + "\n" + yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    tmp.replace(target)
    typer.echo(f"written: {target}")


@tune_app.command("critic")
def tune_critic(
    run: Annotated[Path, typer.Argument(help="a Self-RAG pipeline's folder of a rag eval run (runs/NAME/PIPELINE)")],
    pipeline: Annotated[Optional[Path], typer.Option(
        "--pipeline", "-p", help="write the chosen weights into this pipeline file")] = None,
    metric: Annotated[str, typer.Option(help="match | match_norm | em | f1")] = "match",
    held_out: Annotated[float, typer.Option(min=0.05, max=0.95, help="fraction of questions held out")] = 0.5,
    seed: Annotated[int, typer.Option(help="seed of the tuning / held-out split")] = 0,
    baseline: Annotated[Optional[Path], typer.Option(
        help="another pipeline's folder of the same run (e.g. naive RAG), scored on the same splits")] = None,
    screen: Annotated[bool, typer.Option(
        help="tune the relevance screen of candidates: 1 (w_rel, w_ret) from a run with every candidate")] = False,
) -> None:
    """Calibrate how Self-RAG picks among its candidates (selfrag.w_rel, w_sup, w_use, use_seq,
    w_ret) on a tuning split of an eval run, report the held-out split, record it in a pipeline."""
    import yaml

    from rag.config import load_yaml, pipeline_config
    from rag.eval.calibrate import read_predictions, read_records, tune

    result = tune(read_predictions(run), metric=metric, held_out=held_out, seed=seed,
                  baseline=read_records(baseline)[1] if baseline else None, screen=screen)
    rows = [[name, result[name]["tune"], result[name]["held_out"]]
            for name in ("baseline", "paper", "top_ranked", "tuned", "oracle") if name in result]
    typer.echo(f"{metric}: {result['tune_questions']} tuning / {result['held_out_questions']} held-out questions")
    for name, t, h in rows:
        typer.echo(f"  {name:<11} tune {t:.4f}  held-out {h:.4f}")
    typer.echo(f"chosen: {json.dumps(result['weights'])}")
    if pipeline is None:
        return
    raw = load_yaml(pipeline)
    raw["selfrag"] = {**raw.get("selfrag", {}), **result["weights"]}
    pipeline_config(pipeline, **raw)  # still a valid pipeline
    header = [line for line in pipeline.read_text(encoding="utf-8").splitlines()
              if line.startswith("#") and not line.startswith("# rag tune critic")]
    header.append(f"# rag tune critic {run}: held-out {metric} {result['tuned']['held_out']:.4f} "
                  f"({result['held_out_questions']} questions, seed {seed}; paper weights "
                  f"{result['paper']['held_out']:.4f})")
    tmp = pipeline.with_name(pipeline.name + ".tmp")
    tmp.write_text("\n".join(header) + "\n" + yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    tmp.replace(pipeline)
    typer.echo(f"written: {pipeline}")


models_app = typer.Typer(no_args_is_help=True, help="Packaged and local generator models.")
app.add_typer(models_app, name="models")


@models_app.command("prepare")
def models_prepare(name: str = "smollm2-135m-instruct") -> None:
    """Convert a packaged model to a Hugging Face folder in the cache (once)."""
    from rag.models import prepare_packaged_model

    typer.echo(str(prepare_packaged_model(name)))


@app.command()
def demo(quiet: Quiet = False) -> None:
    """The main job on embedded defaults: index the Python docs topics, search, answer."""
    from rag.config import IndexRecipe, load_recipe
    from rag.index import build_index
    from rag.retriever import load_retriever
    from rag.types import ChatMessage

    recipe = load_recipe(DEMO_RECIPE) if DEMO_RECIPE.exists() else IndexRecipe(
        name="pydoc", corpus="pydoc_data.topics")
    m = build_index(recipe, progress=not quiet)
    typer.echo(f"index {recipe.out_dir()}: {m.passages} passages ({m.embedder['name']}, {m.factory})")
    retriever = load_retriever(recipe.out_dir(), "hybrid")
    for query, hits in zip(DEMO_QUERIES, retriever.search_batch(DEMO_QUERIES, 3), strict=True):
        typer.echo(f"\n? {query}")
        for h in hits:
            typer.echo(f"  {h.rank}. {h.passage.title} ({h.passage.id}) "
                       f"{h.passage.text[:90].replace(chr(10), ' ')}...")
    if not DEMO_PIPELINE.exists():
        return
    typer.echo(f"\nanswers ({DEMO_PIPELINE}):")
    with _pipeline(DEMO_PIPELINE, recipe.out_dir()) as pipe:
        answers = pipe.answer_batch([[ChatMessage(role="user", content=q)] for q in DEMO_QUESTIONS])
    for question, answer in zip(DEMO_QUESTIONS, answers, strict=True):
        typer.echo(f"\nQ: {question}\nA: {answer.text}")
        typer.echo("   sources: " + ", ".join(c.id for c in answer.citations))


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Console entry point: runs the Typer app and turns `RagError`s into one-line errors."""
    import click

    # typer >= 0.29 vendors its own click (typer._click); older ones use click's classes
    try:
        from typer import exceptions as typer_exc
        from typer._click import exceptions as vendored

        exits: tuple[type[BaseException], ...] = (click.exceptions.Exit, typer_exc.Exit)
        usage: tuple[type[BaseException], ...] = (click.ClickException, vendored.ClickException)
        aborts: tuple[type[BaseException], ...] = (click.exceptions.Abort, typer_exc.Abort)
    except ImportError:
        exits, usage, aborts = (click.exceptions.Exit,), (click.ClickException,), (click.exceptions.Abort,)

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    for i, a in enumerate(args):  # `--ray` takes an optional address; click options cannot
        if a == "--ray" and (i + 1 == len(args) or args[i + 1].startswith("-")
                             or args[i + 1].endswith((".yaml", ".yml"))):
            args.insert(i + 1, RAY_LOCAL)
            break
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    # SIGTERM unwinds like Ctrl-C, so engines and their processes are shut down on the way out
    # (`rag serve` installs uvicorn's own handler while it runs)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        rc = typer.main.get_command(app).main(args=args, prog_name="rag", standalone_mode=False)
    except exits as e:
        return int(getattr(e, "exit_code", 0))
    except usage as e:
        e.show()  # type: ignore[attr-defined]
        return int(getattr(e, "exit_code", 2))
    except aborts:
        typer.echo("aborted", err=True)
        return 130
    except RagError as e:
        if debug:
            raise
        typer.echo(f"error: {e}", err=True)
        return 1
    except KeyboardInterrupt:
        typer.echo("interrupted (an index build resumes when run again)", err=True)
        return 130
    return rc if isinstance(rc, int) else 0  # a typer.Exit(code) inside a command


if __name__ == "__main__":
    sys.exit(main())
