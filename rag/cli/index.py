"""``rag index ...``: build, change and inspect index folders."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from rag.cli._common import CorpusFormat, DryRun, Quiet, Wait, Yes, echo_json
from rag.errors import ConfigError

app = typer.Typer(no_args_is_help=True, help="Build and inspect indexes.")
Opt = typer.Option
T = TypeVar("T")


def _folders(folder: Path) -> list[Path]:
    """The folder, or the shards of a sharded folder (`rag.index.shards`)."""
    from rag.index.shards import is_sharded, shard_folders

    return shard_folders(folder) if is_sharded(folder) else [folder]


def _each(folder: Path, change: Callable[[Path], T]) -> list[T]:
    """``change`` on the folder, or on each shard of a sharded folder in turn."""
    return [change(f) for f in _folders(folder)]


def _echo(folder: Path, parts: list[dict[str, Any]]) -> None:
    """One folder's result as it is, a sharded folder's as totals with one entry per shard."""
    if len(parts) == 1:
        echo_json(parts[0])
        return
    totals: dict[str, Any] = {k: sum(p[k] for p in parts) for k in ("passages", "deleted") if k in parts[0]}
    echo_json({"index": str(folder), **totals, "shards": parts})


Precision = Annotated[str | None, Opt(help="encoder precision: auto|fp32|bf16|fp16|int8 (int8 needs the int8 extra)")]
Prompts = Annotated[str | None, Opt(
    help="encoder prompts: model (declared by the encoder; default), none, e5, bge, gte-instruct, instructor")]
RayAddress = Annotated[str | None, Opt(
    help="with --ray: 'auto' joins the cluster of 'ray start' on this machine, HOST:PORT joins that one "
         "(default: start a local cluster for this build)")]
RayActors = Annotated[int | None, Opt(
    min=1, help="embedder actors (default: one per GPU or per --ray-cpus-per-actor CPUs)")]
RayWindow = Annotated[int | None, Opt(min=1, help="passages per Ray task and checkpoint (default: --batch-size)")]


@app.command("build")
def build(
    recipe: Annotated[Path | None, typer.Argument(help="index recipe YAML (indexes/*.yaml)")] = None,
    corpus: Annotated[str | None, Opt(help="corpus file/folder, or pydoc_data.topics")] = None,
    format: Annotated[str | None, Opt(help="auto|jsonl|flashrag|dpr|beir|dir|pydoc")] = None,
    out: Annotated[Path | None, Opt(help="output folder")] = None,
    embedder: Annotated[str | None, Opt(help="encoder name or folder")] = None,
    factory: Annotated[str | None, Opt(help="FAISS factory string")] = None,
    metric: Annotated[str | None, Opt(help="ip or l2")] = None,
    batch_size: Annotated[int | None, Opt(help="passages per encode/checkpoint step")] = None,
    skip_bad_lines: Annotated[bool | None, Opt(help="record malformed lines instead of failing")] = None,
    device: Annotated[str | None, Opt(help="auto|cpu|gpu")] = None,
    precision: Precision = None,
    prompts: Prompts = None,
    force: Annotated[bool, Opt(help="rebuild even if up to date")] = False,
    ray: Annotated[bool, Opt("--ray", help="encode on a Ray cluster (needs the ray extra)")] = False,
    ray_address: RayAddress = None,
    ray_actors: RayActors = None,
    ray_cpus_per_actor: Annotated[int, Opt(min=1, help="CPU threads per actor on CPU clusters")] = 1,
    ray_window: RayWindow = None,
    quiet: Quiet = False,
    wait: Wait = 0.0,
) -> None:
    """Build an index from a corpus (or a recipe); resumes an interrupted build."""
    from rag.config import IndexRecipe
    from rag.index import build_index, folder_size
    from rag.index.ray import RayOptions

    r = IndexRecipe.from_options(
        recipe, corpus=corpus, format=format, out=str(out) if out else None, embedder=embedder, factory=factory,
        metric=metric, batch_size=batch_size, skip_bad_lines=skip_bad_lines, device=device,
        precision=precision, prompts=prompts)
    ray_opts = RayOptions(address=ray_address, actors=ray_actors, cpus_per_actor=ray_cpus_per_actor,
                          window=ray_window) if ray else None
    m = build_index(r, progress=not quiet, force=force, ray=ray_opts, wait=wait)
    echo_json({"index": str(r.out_dir()), "passages": m.passages, "factory": m.factory,
               "embedder": m.embedder_info.name, "build_seconds": m.build_seconds, "bytes": folder_size(r.out_dir())})


@app.command("info")
def info(folder: Path) -> None:
    """Print an index's manifest, counts and size on disk (JSON)."""
    from rag.index import REPORT_FILE, folder_size, read_manifest
    from rag.index.shards import is_sharded, read_shards

    if is_sharded(folder):
        shards = [{"shard": str(f), "passages": m.passages, "deleted_rows": m.deleted, "version": m.version}
                  for f in _folders(folder) for m in [read_manifest(f)]]
        echo_json({**read_shards(folder).model_dump(), "passages": sum(s["passages"] for s in shards),
                   "bytes": folder_size(folder), "shard_folders": shards})
        return
    m = read_manifest(folder)
    report = folder / REPORT_FILE
    try:
        read = json.loads(report.read_text(encoding="utf-8")) if report.exists() else None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{report}: not valid JSON ({e}); run rag index verify {folder}") from None
    echo_json({**m.model_dump(), "bytes": folder_size(folder), "report": read})


def _corpus_change(mode: str, folder: Path, corpus: str, format: str, batch_size: int,
                   skip_bad_lines: bool, quiet: bool, wait: float) -> None:
    from rag.index import upsert

    ms = _each(folder, lambda f: upsert(f, corpus, format=format, batch_size=batch_size, progress=not quiet,
                                        skip_bad_lines=skip_bad_lines, mode=mode, wait=wait))  # type: ignore[arg-type]
    _echo(folder, [{"index": str(f), "passages": m.passages, "change": m.history[-1] if m.history else None}
                   for f, m in zip(_folders(folder), ms, strict=True)])


@app.command("add")
def add(folder: Path, corpus: Annotated[str, Opt(help="corpus to append (ids must be new)")],
        format: CorpusFormat = "auto", batch_size: int = 256, skip_bad_lines: bool = False,
        quiet: Quiet = False, wait: Wait = 0.0) -> None:
    """Append passages to an existing index without rebuilding it."""
    _corpus_change("add", folder, corpus, format, batch_size, skip_bad_lines, quiet, wait)


@app.command("upsert")
def upsert(folder: Path, corpus: Annotated[str, Opt(
               help="corpus whose passages are added, or replace the stored ones with their ids")],
           format: CorpusFormat = "auto", batch_size: int = 256, skip_bad_lines: bool = False,
           quiet: Quiet = False, wait: Wait = 0.0) -> None:
    """Add new passages and replace changed ones (only those are re-encoded); resumable."""
    _corpus_change("upsert", folder, corpus, format, batch_size, skip_bad_lines, quiet, wait)


def _read_ids(ids: list[str] | None, ids_file: Path | None) -> list[str]:
    wanted = list(ids or [])
    if ids_file is not None:
        if not ids_file.is_file():
            raise ConfigError(f"--ids-file {ids_file}: no such file")
        wanted += [line.strip() for line in ids_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    return wanted


@app.command("delete")
def delete(
    folder: Path,
    ids: Annotated[list[str] | None, Opt("--ids", help="passage ids (repeat)")] = None,
    ids_file: Annotated[Path | None, Opt(help="a file of passage ids, one per line")] = None,
    source: Annotated[list[str] | None, Opt(
        help="delete every passage read from this corpus file (or directory), in any spelling; repeat")] = None,
    dry_run: DryRun = False, yes: Yes = False, wait: Wait = 0.0,
) -> None:
    """Delete passages: they never come back from any search mode and their text leaves the store."""
    from rag.index import delete, plan_delete, read_manifest

    wanted = _read_ids(ids, ids_file)

    def one(f: Path) -> dict[str, Any]:
        if dry_run:
            plan = plan_delete(f, wanted, sources=source or [])
            return {"index": str(f), "dry_run": True, "deleted": plan.removed, "passages": plan.stored,
                    "ids": plan.removed_ids}
        before = read_manifest(f).passages
        m = delete(f, wanted, sources=source or [], yes=yes, wait=wait)
        return {"index": str(f), "deleted": before - m.passages, "passages": m.passages,
                "deleted_rows": m.deleted, "version": m.version}

    _echo(folder, _each(folder, one))


@app.command("sync")
def sync(folder: Path, quiet: Quiet = False, dry_run: DryRun = False, yes: Yes = False, wait: Wait = 0.0) -> None:
    """Re-read the corpora named in the manifest (by absolute path) and apply the difference
    (added, changed, removed records and files)."""
    from rag.index import plan_sync, read_manifest, sync

    def one(f: Path) -> dict[str, Any]:
        if dry_run:
            return {"index": str(f), "dry_run": True, "changes": [
                {**p.model_dump(exclude={"removed_ids"}), "removed_ids": p.removed_ids[:100]} for p in plan_sync(f)]}
        n = len(read_manifest(f).history)
        m = sync(f, progress=not quiet, yes=yes, wait=wait)
        return {"index": str(f), "passages": m.passages, "version": m.version, "changes": m.history[n:]}

    _echo(folder, _each(folder, one))


@app.command("compact")
def compact(folder: Path, wait: Wait = 0.0) -> None:
    """Drop deleted passages' vectors from the FAISS structure (no re-encoding)."""
    from rag.index import compact, folder_size

    def one(f: Path) -> dict[str, Any]:
        before = folder_size(f)
        m = compact(f, wait=wait)
        return {"index": str(f), "passages": m.passages, "bytes_before": before, "bytes": folder_size(f)}

    _echo(folder, _each(folder, one))


@app.command("import")
def import_(
    index_file: Annotated[Path, typer.Argument(help="an existing FAISS index file (e.g. FlashRAG's e5_Flat.index)")],
    corpus: Annotated[str, Opt(help="its passages in row order (wiki18_100w.jsonl, psgs_w100.tsv)")],
    out: Annotated[Path, Opt(help="the rag index folder to write")],
    embedder: Annotated[str, Opt(help="the encoder the vectors were made with (queries use it)")],
    format: CorpusFormat = "auto",
    prompts: Annotated[str, Opt(help="model|none|e5|bge|gte-instruct|instructor")] = "model",
    normalize: Annotated[bool, Opt(help="the vectors are unit length (cosine)")] = True,
    check: Annotated[bool, Opt(help="re-encode a sample and compare with the stored vectors")] = True,
) -> None:
    """Wrap an existing FAISS index and its corpus into an index folder, without re-encoding."""
    from rag.index import folder_size, import_index

    m = import_index(index_file, corpus, out, embedder=embedder, format=format, prompts=prompts,
                     normalize=normalize, check=check)
    echo_json({"index": str(out), "passages": m.passages, "factory": m.factory, "metric": m.metric,
               "check": m.history[-1], "bytes": folder_size(out)})


@app.command("verify")
def verify(folder: Path) -> None:
    """Check every file of an index folder against the sizes and sha256 its manifest recorded."""
    from rag.index import verify

    problems = [line for problems in _each(folder, verify) for line in problems]
    for line in problems:
        typer.echo(line)
    if problems:
        typer.echo(f"{folder}: damaged; rebuild it (rag index build ... --out {folder} --force) or restore a copy")
        raise typer.Exit(1)
    typer.echo(f"{folder}: intact")
    for left in (p for f in _folders(folder) if (f / ".work").is_dir() for p in sorted((f / ".work").iterdir())):
        typer.echo(f"note: an interrupted change left {left}; the same command again finishes it "
                   "(any other change removes it)")


@app.command("shard")
def shard(
    folder: Annotated[Path, typer.Argument(help="the index folder to split (it is not changed)")],
    shards: Annotated[int, Opt(min=2, help="how many shards")],
    out: Annotated[Path, Opt(help="the sharded folder to write (shards.json + shard-0 ...)")],
    wait: Wait = 0.0,
) -> None:
    """Split an index folder into K shard folders under one parent, without re-encoding; every
    rag command (search, serve, eval, changes) takes the parent like any index folder."""
    from rag.index import folder_size, read_manifest
    from rag.index.shards import shard_folders, shard_index

    shard_index(folder, out, shards, wait=wait)
    echo_json({"index": str(out), "shards": [{"shard": str(f), "passages": read_manifest(f).passages}
                                             for f in shard_folders(out)], "bytes": folder_size(out)})
