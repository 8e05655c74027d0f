"""Changing a built index: delete, upsert, sync (re-read the corpora), compact.

Deleting removes a passage from the store (its text is gone) and lists its row as deleted;
the vector stays in ``index.faiss`` and every search skips it (an ID selector inside the FAISS
search, exact for every index type). Upserting deletes the old row of a changed passage and
appends the re-encoded one (unchanged passages are not re-encoded). `compact` rebuilds the FAISS
structure from the live vectors it already holds (no re-encoding) and renumbers the rows.

Each change works on a copy of the folder (``<out>.partial``: the store copied, the other files
hard-linked, since they are only ever replaced, never written in place), records itself in the
manifest's history, and is swapped in by `rag.index.folder.publish`, so a reader sees the old or
the new index. Upserts keep build checkpoints: after ``kill -9`` the same command resumes; a
change killed after its swap finds nothing left to do on the rerun.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from rag.corpus import PYDOC_CORPUS, ReadReport, Record, corpus_fingerprint, iter_records
from rag.embedding import Embedder
from rag.errors import ConfigError, IndexCorruptError, RagError
from rag.index.checkpoints import Shards, commit, encode_into
from rag.index.folder import (
    INDEX_FILE,
    REPORT_FILE,
    STORE_FILE,
    Manifest,
    atomic_write_json,
    check_embedder,
    embedder_from_manifest,
    publish,
    read_manifest,
    write_manifest,
)
from rag.index.vectors import FaissIndex
from rag.store import PassageStore


def lossless(factory: str) -> bool:
    """Whether the index stores its vectors exactly (Flat, HNSW<M>[,Flat], IVF<n>,Flat)."""
    parts = factory.split(",")
    return factory == "Flat" or (parts[0].startswith(("HNSW", "IVF")) and parts[-1] in ("Flat", parts[0])
                                 and not (parts[0].startswith("IVF") and len(parts) == 1))


def _key(out: Path, manifest: Manifest, op: str, *args: Any) -> str:
    """Identifies one change of one version of the folder (a rerun after it landed is a new one)."""
    parts = [op, str(out.resolve()), manifest.built_at, len(manifest.history), *map(str, args)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def work_copy(out: Path, key: str) -> Path:
    """The work folder of change ``key``: the one an interrupted run of it left, else a new copy."""
    work = out.with_name(out.name + ".partial")
    if work.exists():
        try:
            with PassageStore(work / STORE_FILE) as s:
                same = s.get_state("key") == key
        except RagError:
            same = False
        if not same:
            shutil.rmtree(work)
    if not work.exists():
        tmp = out.with_name(out.name + ".partial.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in out.iterdir():
            if f.name == STORE_FILE:
                shutil.copy2(f, tmp / f.name)  # SQLite writes in place: a real copy
            elif f.is_file() and not f.name.startswith(STORE_FILE):
                os.link(f, tmp / f.name)  # replaced by rename when changed, never written
        with PassageStore(tmp / STORE_FILE) as s:
            s.add([], state={"key": key, "records_done": "0", "base": str(s.next_row())})
        os.rename(tmp, work)
    return work


def _finish(work: Path, out: Path, manifest: Manifest, entry: dict[str, Any], t0: float,
            **update: Any) -> Manifest:
    with PassageStore(work / STORE_FILE) as s:
        live, deleted = len(s), len(s.deleted_rows())
    entry = {"op": entry.pop("op"), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             **entry, "seconds": round(time.time() - t0, 3), "passages": live}
    new = manifest.model_copy(update={"passages": live, "deleted": deleted, "build_key": "",
                                      "history": [*manifest.history, entry], **update})
    new = write_manifest(work, new)
    publish(work, out)
    return new


def _ids_for(store: PassageStore, ids: Sequence[str], sources: Sequence[str]) -> list[str]:
    wanted = list(ids)
    for source in sources:
        wanted += store.ids_under(os.path.normpath(source))
    return list(dict.fromkeys(wanted))


def delete(folder: str | Path, ids: Sequence[str] = (), *, sources: Sequence[str] = ()) -> Manifest:
    """Delete passages by id and/or by the corpus file they came from. Unknown ids are ignored;
    the history entry counts what was deleted."""
    t0 = time.time()
    out = Path(folder)
    manifest = read_manifest(out)
    if not ids and not sources:
        raise ConfigError("nothing to delete: give --ids, --ids-file or --source")
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)  # deletes start over
    with PassageStore(out / STORE_FILE, readonly=True) as s:
        wanted = _ids_for(s, ids, sources)
        present = list(s.texts(wanted))
    if not present:
        return manifest  # nothing there (or a rerun after the change landed)
    work = work_copy(out, _key(out, manifest, "delete", sorted(present)))
    with PassageStore(work / STORE_FILE) as s:
        rows = s.delete(present)
    return _finish(work, out, manifest, {"op": "delete", "deleted": len(rows),
                                         "sources": list(sources)}, t0)


def _changed(records: Iterator[Record], original: PassageStore, seen: set[str], counts: dict[str, int],
             batch: int = 512) -> Iterator[Record]:
    """The records that are new or whose title/text/metadata differ from ``original``'s."""
    pending: list[Record] = []

    def flush() -> Iterator[Record]:
        stored = original.texts([r.passage.id for r in pending])
        for r in pending:
            p, old = r.passage, stored.get(r.passage.id)
            if old is None:
                counts["added"] += 1
            elif old != (p.title, p.text, json.dumps(p.meta, ensure_ascii=False)):
                counts["changed"] += 1
            else:
                counts["unchanged"] += 1
                continue
            yield r
        pending.clear()

    for r in records:
        seen.add(r.passage.id)
        pending.append(r)
        if len(pending) == batch:
            yield from flush()
    yield from flush()


def _replace(store: PassageStore, batch: list[Record], records_done: int, key: str) -> None:
    store.add([r.passage for r in batch], state={"records_done": str(records_done), "key": key},
              locations=[f"{r.source}:{r.line}" if r.line else r.source for r in batch],
              sources=[r.source for r in batch], replace=True)


def upsert(folder: str | Path, corpus: str | Path, *, format: str = "auto", embedder: Embedder | None = None,
           batch_size: int = 256, skip_bad_lines: bool = False, progress: bool = True,
           chunk_size: int = 100, chunk_stride: int | None = None,
           mode: Literal["add", "upsert", "sync"] = "upsert") -> Manifest:
    """Add the corpus's new passages and replace the changed ones (re-encoding only those).

    ``mode``: ``upsert``; ``add`` (every record is new: an id already stored is an error);
    ``sync`` (an upsert that also deletes the passages read from this corpus's files earlier
    that it no longer holds, whole files included).
    """
    t0 = time.time()
    out = Path(folder)
    manifest = read_manifest(out)
    embedder = embedder or embedder_from_manifest(manifest)
    check_embedder(manifest, embedder, out)
    fingerprint = corpus_fingerprint(corpus, format)
    work = work_copy(out, _key(out, manifest, mode, str(corpus), format, fingerprint, skip_bad_lines,
                               chunk_size, chunk_stride))
    counts = {"added": 0, "changed": 0, "unchanged": 0}
    seen: set[str] = set()
    report = ReadReport()
    with PassageStore(out / STORE_FILE, readonly=True) as original, \
            PassageStore(work / STORE_FILE) as store:
        base = int(store.get_state("base") or 0)
        records = iter_records(corpus, format, skip_bad_lines=skip_bad_lines, report=report,
                               chunk_size=chunk_size, chunk_stride=chunk_stride)
        if mode != "add":
            records = _changed(records, original, seen, counts)
        encode_into(work, store, records, embedder, batch_size, manifest.name, store.get_state("key") or "",
                    progress, add=commit if mode == "add" else _replace)
        removed: list[str] = []
        if mode == "sync":  # records gone from a file, and files gone from a directory
            removed = [i for i in original.ids_under(str(corpus)) if i not in seen]
            store.delete(removed)
        count = store.next_row()
    if mode == "add":
        counts["added"] = count - base
    if counts["added"] + counts["changed"] + len(removed) == 0:
        shutil.rmtree(work)
        return manifest
    index = FaissIndex.load(work / INDEX_FILE, metric=manifest.metric, device="cpu")
    if index.ntotal == base:  # (== count: an interrupted run already added them)
        for vecs in Shards(work).iter(base, count):
            index.add(vecs)
        index.save(work / INDEX_FILE)
    elif index.ntotal != count:
        raise IndexCorruptError(f"{out / INDEX_FILE}: holds {index.ntotal} vectors, the store {base} rows; "
                                "rebuild the index")
    prev = json.loads((work / REPORT_FILE).read_text()) if (work / REPORT_FILE).exists() else {}
    atomic_write_json(work / REPORT_FILE, {"corpora": prev.get("corpora", []) + [report.to_json()]})
    corpora = [c for c in manifest.corpora if c["path"] != str(corpus)]
    corpora.append({"path": str(corpus), "format": format, "fingerprint": fingerprint,
                    "passages": counts["added"] + counts["changed"] + counts["unchanged"],
                    "chunk_size": chunk_size, "chunk_stride": chunk_stride})
    return _finish(work, out, manifest, {"op": mode, "corpus": str(corpus), "fingerprint": fingerprint,
                                         **counts, "removed": len(removed)}, t0, corpora=corpora)


def add_to_index(folder: str | Path, corpus: str | Path, **kwargs: Any) -> Manifest:
    """Append a corpus without rebuilding (no retraining of IVF/PQ); ids must be new."""
    return upsert(folder, corpus, mode="add", **kwargs)


def sync(folder: str | Path, *, progress: bool = True, embedder: Embedder | None = None) -> Manifest:
    """Re-read every corpus named in the manifest and apply the difference: new and changed
    passages are (re-)encoded, passages whose record or file is gone are deleted."""
    manifest = read_manifest(folder)
    for c in manifest.corpora:
        path = c["path"]
        if not Path(path).exists() and path != PYDOC_CORPUS:
            raise ConfigError(f"{folder}: corpus {path} named in the manifest does not exist (moved?); "
                              f"delete its passages with rag index delete {folder} --source {path}")
        if corpus_fingerprint(path, c.get("format", "auto")) == c.get("fingerprint"):
            continue
        manifest = upsert(folder, path, format=c.get("format", "auto"), embedder=embedder, progress=progress,
                          chunk_size=c.get("chunk_size", 100), chunk_stride=c.get("chunk_stride"), mode="sync")
    return manifest


def compact(folder: str | Path) -> Manifest:
    """Drop the deleted rows' vectors: a new FAISS structure (same factory and training) filled
    with the live vectors the index holds, rows renumbered; nothing is re-encoded."""
    t0 = time.time()
    out = Path(folder)
    manifest = read_manifest(out)
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)  # compaction starts over
    if manifest.deleted == 0:
        return manifest
    if not lossless(manifest.factory):
        raise ConfigError(f"{out}: {manifest.factory} stores lossy codes, so its vectors cannot be re-added "
                          "exactly; deleted rows stay skipped (searches are exact); rebuild with rag index build "
                          "to reclaim the space")
    work = work_copy(out, _key(out, manifest, "compact"))
    index = FaissIndex.load(work / INDEX_FILE, metric=manifest.metric, device="cpu")
    with PassageStore(work / STORE_FILE) as store:
        live = store.live_rows()
        dropped = len(store.deleted_rows())
        fresh = index.faiss.clone_index(index.cpu_index)
        fresh.reset()  # keeps the IVF quantizer / training; empties lists, graph and storage
        new = FaissIndex(fresh, metric=manifest.metric, device="cpu")
        for i in range(0, len(live), 65_536):
            new.add(index.vectors(live[i: i + 65_536]))
        new.save(work / INDEX_FILE)
        store.compact()
    return _finish(work, out, manifest, {"op": "compact", "dropped": dropped}, t0)
