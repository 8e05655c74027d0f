"""An index version's files, its typed manifest, checksums, and how a finished change is published.

A version folder (``versions/v<N>/``, see `rag.index.owner` for the whole layout)::

    index.faiss     the vector index (always written from a CPU copy); label i = store row i
    passages.db     PassageStore (SQLite): live passages by row, and the rows deleted since the
                    last compaction (their vectors stay in index.faiss, never returned)
    manifest.json   embedder identity, factory, metric, counts, corpora and their fingerprints,
                    change history, size + sha256 of every other file, versions, its own digest
    report.json     what the builds read: passages, empty texts skipped, bad lines skipped
    bm25/           the BM25 cache (made on first BM25 search; not checksummed)

No checksummed file of a published version is written again (readers may add its bm25/ cache):
a change copies what it needs into its work folder and `finish` publishes the result as the next
version.
"""

from __future__ import annotations

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
from rag.errors import IndexCorruptError, IndexMismatchError, validation_message
from rag.index.owner import CURRENT, LINKED, WORK, Version, Writer, current_version, not_found

log = logging.getLogger(__name__)

INDEX_FILE, STORE_FILE, MANIFEST_FILE, REPORT_FILE = (
    "index.faiss", "passages.db", "manifest.json", "report.json")
CHECKSUMMED = (INDEX_FILE, STORE_FILE, REPORT_FILE)
FORMAT_VERSION = 1


class EmbedderInfo(BaseModel):
    """The manifest's ``embedder`` entry: the encoder an index was built with."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    name: str
    dim: int
    normalize: bool = True
    query_prompt: str = ""
    passage_prompt: str = ""
    precision: str = "fp32"


class CorpusEntry(BaseModel):
    """One of the manifest's ``corpora``: a corpus by its absolute path, and its fingerprint."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    path: str
    format: str = "auto"
    fingerprint: str | None = None
    chunk_size: int = 100
    chunk_stride: int | None = None


class Manifest(BaseModel):
    """What an index folder was built from; checked whenever the index is loaded. ``embedder``
    and ``corpora`` stay the JSON written (the digest covers it byte for byte); read them typed
    through `embedder_info` and `corpus_entries`."""

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
    version: int = Field(0, description="the version number (versions/v<N>); 0: written before versions")
    change_key: str = Field("", description="the build or change that wrote this version (resuming it)")
    digest: str = Field("", description="sha256 of the rest of the manifest, so verify sees a hand edit")
    shard: dict[str, Any] | None = Field(None, description="a shard's place in its sharded folder "
                                         "(index, of, rule, source; rag.index.shards)")

    @property
    def embedder_info(self) -> EmbedderInfo:
        return EmbedderInfo.model_validate(self.embedder)

    @property
    def corpus_entries(self) -> list[CorpusEntry]:
        return [CorpusEntry.model_validate(c) for c in self.corpora]


def manifest_digest(manifest: Manifest) -> str:
    unsharded = {"shard"} if manifest.shard is None else set()  # digests written before shards stay valid
    data = json.dumps(manifest.model_dump(exclude={"digest", *unsharded}), sort_keys=True, ensure_ascii=False)
    return "sha256:" + hashlib.sha256(data.encode()).hexdigest()


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
    """The manifest of the version ``folder`` publishes (or of a version folder itself)."""
    folder = Path(folder)
    version = current_version(folder)
    if version is None:
        raise not_found(folder)
    return load_manifest(version.path)


def load_manifest(version: Path) -> Manifest:
    path = version / MANIFEST_FILE
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise not_found(version) from None
    except ValidationError as e:
        raise damaged(path, f"not a valid manifest ({validation_message(e.errors())})") from None


def check_embedder(manifest: Manifest, embedder: Embedder, folder: str | Path) -> None:
    """Refuse an embedder that differs from the one the index was built with."""
    built, got = manifest.embedder_info.model_dump(), identity(embedder)
    diffs = [f"{k}: index has {built[k]!r}, got {got[k]!r}" for k in got
             if k != "precision" and built[k] != got[k]]
    if built["precision"] != got["precision"]:
        # compatible (same model, embeddings agree to ~0.998 cosine) but worth knowing
        log.warning("index %s was built at %s precision; queries are encoded at %s",
                    folder, built["precision"], got["precision"])
    if diffs:
        raise IndexMismatchError(
            f"index {folder} was built with a different embedder ({'; '.join(diffs)}). "
            f"Query it with the embedder its manifest names ({built['name']}; rag search and pipelines "
            f"load that one by default), or rebuild it: "
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
    e = manifest.embedder_info
    kw = {"normalize": e.normalize, "query_prompt": e.query_prompt, "passage_prompt": e.passage_prompt,
          "precision": e.precision, **overrides}
    return load_embedder(e.name, **kw)



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
    """Problems with the published version of ``folder``, one line each (empty: intact): its
    files against the sizes and sha256 its manifest recorded, the manifest against its own
    digest, the counts, dimension and metric of the store and the FAISS index against the
    manifest, and the links at the top of the folder. ``checksums=False`` compares sizes and
    the digest only (cheap enough for every open)."""
    folder = Path(folder)
    version = current_version(folder)
    if version is None:
        raise not_found(folder)
    problems = check_version(version.path, checksums=checksums)
    if version.path != folder and version.path != folder / CURRENT:
        problems += _check_links(folder, version)
    return problems


def check_version(path: Path, *, checksums: bool = True) -> list[str]:
    """`verify` for one version folder."""
    manifest = load_manifest(path)
    problems = []
    if manifest.digest and manifest.digest != manifest_digest(manifest):
        problems.append(f"{path / MANIFEST_FILE}: edited after it was written (its digest differs); its fields "
                        "(metric, factory, embedder, counts) decide how the index is searched: restore the file")
    for name, rec in manifest.files.items():
        file = path / name
        if not file.exists():
            problems.append(f"{file}: missing")
        elif file.stat().st_size != rec["bytes"]:
            problems.append(f"{file}: {file.stat().st_size} bytes, the manifest recorded {rec['bytes']} "
                            "(truncated or overwritten)")
        elif checksums and sha256(file) != rec["sha256"]:
            problems.append(f"{file}: sha256 differs from the manifest (corrupted)")
    if checksums and not problems and manifest.files:
        problems += _check_contents(path, manifest)
    return problems


def _check_contents(path: Path, manifest: Manifest) -> list[str]:
    """The store's and the FAISS index's counts, dimension and metric against the manifest."""
    from rag.errors import RagError
    from rag.index.vectors import FaissIndex
    from rag.store import PassageStore

    try:
        with PassageStore(path / STORE_FILE, readonly=True) as store:
            live, deleted = len(store), len(store.deleted_rows())
        index = FaissIndex.load(path / INDEX_FILE, metric=manifest.metric, device="cpu", mmap=True)
    except RagError as e:
        return [str(e)]
    problems = []
    if (live, deleted) != (manifest.passages, manifest.deleted):
        problems.append(f"{path / STORE_FILE}: {live} live and {deleted} deleted passages, the manifest says "
                        f"{manifest.passages} and {manifest.deleted}")
    if index.ntotal != live + deleted:
        problems.append(f"{path / INDEX_FILE}: {index.ntotal} vectors for {live + deleted} store rows")
    if index.dim != manifest.embedder_info.dim:
        problems.append(f"{path / INDEX_FILE}: {index.dim}-d vectors, the manifest's embedder "
                        f"{manifest.embedder_info.dim}-d")
    metric = {0: "ip", 1: "l2"}.get(int(index.cpu_index.metric_type), str(index.cpu_index.metric_type))
    if metric != manifest.metric:
        problems.append(f"{path / INDEX_FILE}: metric {metric}, the manifest says {manifest.metric}")
    return problems


def _check_links(folder: Path, version: Version) -> list[str]:
    problems = []
    for name in LINKED:
        top, want = folder / name, f"{CURRENT}/{name}"
        if top.is_symlink():
            if os.readlink(top) != want:
                problems.append(f"{top}: points to {os.readlink(top)}, not to {want} (changed by hand)")
        elif top.exists():
            problems.append(f"{top}: a file where the link to {want} belongs (replaced by hand)")
        elif (version.path / name).exists():
            problems.append(f"{top}: missing (the link to {want})")
    return problems


def damaged(path: Path, what: str) -> IndexCorruptError:
    return IndexCorruptError(f"{path}: {what}; the index folder is damaged: rebuild it "
                             f"(rag index build ... --out {path.parent} --force) or restore it from a copy")


def check_sizes(version: Path) -> None:
    """Refuse to open a version whose files are not the sizes its manifest recorded."""
    problems = check_version(version, checksums=False)
    if problems:
        raise IndexCorruptError(f"{problems[0]}; the index folder is damaged: run rag index verify on it, "
                                "then rebuild it (rag index build ... --force) or restore it")


def check_intact(folder: Path) -> Version:
    """The folder's published version, refused if `verify` finds anything (before a change)."""
    version = current_version(folder)
    if version is None:
        raise not_found(folder)
    problems = verify(folder)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise IndexCorruptError(f"{problems[0]}{more}; nothing was changed: the index folder is damaged. "
                                f"See rag index verify {folder}, then rebuild it (rag index build ... --out "
                                f"{folder} --force) or restore it from a copy")
    return version


def write_manifest(folder: Path, manifest: Manifest) -> Manifest:
    """Record the files' checksums and write the manifest (last: it marks the folder finished)."""
    manifest = manifest.model_copy(update={"files": file_records(folder), "versions": versions()})
    manifest = manifest.model_copy(update={"digest": manifest_digest(manifest)})
    atomic_write_json(folder / MANIFEST_FILE, manifest.model_dump())
    return manifest


def finish(writer: Writer, work: Path, manifest: Manifest, key: str) -> Manifest:
    """Publish the finished ``work`` folder as the folder's next version."""
    shutil.rmtree(work / "emb", ignore_errors=True)
    shutil.rmtree(work / "todo", ignore_errors=True)  # ray builds' window texts
    if (work / STORE_FILE).exists():
        import sqlite3

        db = sqlite3.connect(work / STORE_FILE)
        try:  # readers of a published version then create no -wal/-shm files beside it
            db.execute("PRAGMA journal_mode=DELETE")
        finally:
            db.close()
    for leftover in work.glob("passages.db-*"):
        leftover.unlink()
    manifest = write_manifest(work, manifest.model_copy(update={"version": writer.next_number(),
                                                                "change_key": key}))
    base = writer.current
    if base is not None and (base.path / "bm25").is_dir() and manifest.shard is None:  # shards: corpus-wide stats
        _carry_bm25(work)
    writer.publish(work, manifest.version)
    return manifest


def _carry_bm25(work: Path) -> None:
    """Build the BM25 cache of a new version whose predecessor had one (someone searches it with
    BM25), so readers that follow the folder switch without building it on a search's time."""
    from rag.errors import BackendUnavailableError
    from rag.retriever import BM25Retriever

    try:
        BM25Retriever(work).close()
    except BackendUnavailableError:
        pass


def resume_finished(writer: Writer, key: str) -> Manifest | None:
    """The manifest of change ``key`` if a killed run of it already finished its work: an
    unpublished version (published now) or a work folder with its manifest written (published now)."""
    version = writer.unpublished(key)
    if version is not None:
        writer.make_current(version)
        return load_manifest(version.path)
    work = writer.folder / WORK / key
    if (work / MANIFEST_FILE).exists():
        return finish(writer, work, load_manifest(work), key)
    return None


def folder_size(folder: str | Path) -> int:
    """Bytes on disk under ``folder`` (links not followed, hard-linked files counted once)."""
    seen, total = set(), 0
    for root, _, files in os.walk(folder):  # does not descend into `current`
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if not os.path.islink(os.path.join(root, name)) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total
