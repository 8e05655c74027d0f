"""An index folder: its files, its typed manifest, checksums, and how a new version replaces it.

Folder layout (``indexes/<name>/``)::

    index.faiss     the vector index (always written from a CPU copy); label i = store row i
    passages.db     PassageStore (SQLite): live passages by row, and the rows deleted since the
                    last compaction (their vectors stay in index.faiss, never returned)
    manifest.json   embedder identity, factory, metric, counts, corpora and their fingerprints,
                    change history, size + sha256 of every other file, versions
    report.json     what the builds read: passages, empty texts skipped, bad lines skipped
    bm25/           the BM25 cache (made on first BM25 search; not checksummed)

Every change (build, add, delete, upsert, sync, compact) is made in a sibling work folder and
swapped in by one atomic directory exchange, so a reader sees the old or the new index.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import shutil
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rag.config import IndexRecipe
from rag.embedding import Embedder, identity, load_embedder, resolve_prompts
from rag.errors import IndexCorruptError, IndexMismatchError, IndexNotFoundError

log = logging.getLogger(__name__)

INDEX_FILE, STORE_FILE, MANIFEST_FILE, REPORT_FILE = (
    "index.faiss", "passages.db", "manifest.json", "report.json")
CHECKSUMMED = (INDEX_FILE, STORE_FILE, REPORT_FILE)
FORMAT_VERSION = 1


class Manifest(BaseModel):
    """What an index folder was built from; checked whenever the index is loaded."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    name: str
    embedder: dict[str, Any]
    factory: str
    metric: str
    passages: int = Field(description="live passages (searchable)")
    deleted: int = Field(0, description="deleted rows still in index.faiss (rag index compact drops them)")
    corpora: list[dict[str, Any]]
    versions: dict[str, str]
    built_at: str
    build_seconds: float
    build_key: str = ""
    history: list[dict[str, Any]] = Field(default_factory=list, description="changes after the build")
    files: dict[str, dict[str, Any]] = Field(default_factory=dict, description="bytes and sha256 per file")


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for dist in ("rag-pipeline", "faiss-cpu", "faiss-gpu-cu12", "sentence-transformers", "torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def atomic_write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_manifest(folder: str | Path) -> Manifest:
    path = Path(folder) / MANIFEST_FILE
    if not path.exists():
        hint = " (a build is in progress or was interrupted: run the same build again to resume)" \
            if Path(str(folder) + ".partial").exists() else ""
        raise IndexNotFoundError(f"no index at {folder}: {MANIFEST_FILE} missing{hint}; "
                                 "build one with 'rag index build'")
    try:
        return Manifest.model_validate_json(path.read_text(encoding="utf-8"))
    except (ValidationError, UnicodeDecodeError) as e:
        first = e.errors()[0] if isinstance(e, ValidationError) else {"loc": (), "msg": str(e)}
        field = ".".join(map(str, first["loc"])) or "the file"
        raise damaged(path, f"not a valid manifest ({field}: {first['msg']})") from None


def check_embedder(manifest: Manifest, embedder: Embedder, folder: str | Path) -> None:
    """Refuse an embedder that differs from the one the index was built with."""
    built, got = manifest.embedder, identity(embedder)
    diffs = [f"{k}: index has {built.get(k)!r}, got {got[k]!r}" for k in got
             if k != "precision" and built.get(k) != got[k]]
    if built.get("precision", "fp32") != got["precision"]:
        # compatible (same model, embeddings agree to ~0.998 cosine) but worth knowing
        log.warning("index %s was built at %s precision; queries are encoded at %s",
                    folder, built.get("precision", "fp32"), got["precision"])
    if diffs:
        raise IndexMismatchError(
            f"index {folder} was built with a different embedder ({'; '.join(diffs)}). "
            f"Query it with --embedder {built.get('name')} (the default), or rebuild it: "
            f"rag index build --corpus ... --out {folder} --embedder {got['name']}")


def embedder_for(recipe: IndexRecipe) -> Embedder:
    """The recipe's encoder with its prompts resolved (`rag.embedding.resolve_prompts`); the
    manifest records them and queries use them."""
    query, passage = resolve_prompts(recipe.embedder, recipe.prompts, recipe.query_prompt, recipe.passage_prompt)
    return load_embedder(recipe.embedder, normalize=recipe.normalize, query_prompt=query, passage_prompt=passage,
                         precision=recipe.precision)


def embedder_from_manifest(manifest: Manifest, **overrides: Any) -> Embedder:
    """The embedder an index was built with, at its precision (``overrides``: device,
    batch_size, precision...)."""
    e = manifest.embedder
    kw = {"normalize": e["normalize"], "query_prompt": e["query_prompt"],
          "passage_prompt": e["passage_prompt"], "precision": e.get("precision", "fp32"), **overrides}
    return load_embedder(e["name"], **kw)



def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of the folder's checksummed files (for the manifest)."""
    return {name: {"bytes": (folder / name).stat().st_size, "sha256": sha256(folder / name)}
            for name in CHECKSUMMED if (folder / name).exists()}


def verify(folder: str | Path, *, checksums: bool = True) -> list[str]:
    """Problems with a folder's files against its manifest, one line each (empty: intact).
    ``checksums=False`` compares sizes only (cheap enough for every open)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if not manifest.files:
        return []  # built before checksums were recorded
    problems = []
    for name, rec in manifest.files.items():
        path = folder / name
        if not path.exists():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != rec["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, the manifest recorded {rec['bytes']} "
                            "(truncated or overwritten)")
        elif checksums and sha256(path) != rec["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (corrupted)")
    return problems


def damaged(path: Path, what: str) -> IndexCorruptError:
    return IndexCorruptError(f"{path}: {what}; the index folder is damaged: rebuild it "
                             f"(rag index build ... --out {path.parent} --force) or restore it from a copy")


def check_sizes(folder: Path) -> None:
    """Refuse to open a folder whose files are not the sizes its manifest recorded."""
    problems = verify(folder, checksums=False)
    if problems:
        raise IndexCorruptError(f"{problems[0]}; the index folder is damaged: run rag index verify {folder}, "
                                f"then rebuild it (rag index build ... --out {folder} --force) or restore it")


def write_manifest(folder: Path, manifest: Manifest) -> Manifest:
    """Record the files' checksums and write the manifest (last: it marks the folder finished)."""
    manifest = manifest.model_copy(update={"files": file_records(folder), "versions": versions()})
    atomic_write_json(folder / MANIFEST_FILE, manifest.model_dump())
    return manifest


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def publish(partial: Path, out: Path) -> None:
    """Replace ``out`` with the finished ``partial`` folder: one atomic exchange where the
    system has it (readers see the old or the new folder), else two renames."""
    shutil.rmtree(partial / "emb", ignore_errors=True)
    shutil.rmtree(partial / "todo", ignore_errors=True)  # ray builds' window texts
    for leftover in partial.glob("passages.db-*"):  # SQLite WAL/SHM, checkpointed on close
        leftover.unlink()
    if out.exists() and _exchange(partial, out):
        shutil.rmtree(partial, ignore_errors=True)  # now the old version
        return
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
    os.rename(partial, out)
    shutil.rmtree(old, ignore_errors=True)


def folder_size(folder: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
