"""Changing a built index: delete, upsert, sync (re-read the corpora), compact.

Deleting removes a passage from the store (its text is gone) and lists its row as deleted;
the vector stays in ``index.faiss`` and every search skips it (an ID selector inside the FAISS
search, exact for every index type). Upserting deletes the old row of a changed passage and
appends the re-encoded one (unchanged passages are not re-encoded). `compact` rebuilds the FAISS
structure from the live vectors it already holds (no re-encoding) and renumbers the rows.

Every change holds the folder's writer lock (`rag.index.owner.writing`), refuses a damaged folder
before any work (`rag.index.folder.check_intact`), works in ``.work/<key>`` (the store copied,
the other files hard-linked), records itself in the manifest's history and is published as the
next version (`rag.index.folder.finish`), so readers see the old or the new version, whole.
After ``kill -9`` the same command finishes the change: upserts resume from their checkpoints,
and a change killed after its work was done publishes that work. A change that would remove more
than half of the passages (or of one corpus's) asks for ``yes``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from rag.corpus import PYDOC_CORPUS, ReadReport, Record, corpus_fingerprint, iter_records
from rag.embedding import Embedder
from rag.errors import CheckpointError, ConfigError
from rag.index.checkpoints import Shards, commit, encode_into
from rag.index.folder import (
    INDEX_FILE,
    REPORT_FILE,
    STORE_FILE,
    CorpusEntry,
    Manifest,
    atomic_write_json,
    check_embedder,
    check_intact,
    embedder_from_manifest,
    finish,
    load_manifest,
    resume_finished,
)
from rag.index.owner import Version, Writer, open_version, writing
from rag.index.shards import owned
from rag.index.vectors import FaissIndex
from rag.store import PassageStore

Mode = Literal["add", "upsert", "sync"]


class ChangePlan(BaseModel):
    """What a change would do (``--dry-run``), counted without encoding anything."""

    op: str
    corpus: str | None = None
    added: int = 0
    changed: int = 0
    unchanged: int = 0
    removed: int = 0
    removed_ids: list[str] = []
    stored: int = 0  # passages the index holds from this corpus (or in all, for delete)


def lossless(factory: str) -> bool:
    """Whether the index stores its vectors exactly (Flat, HNSW<M>[,Flat], IVF<n>,Flat)."""
    parts = factory.split(",")
    return factory == "Flat" or (parts[0].startswith(("HNSW", "IVF")) and parts[-1] in ("Flat", parts[0])
                                 and not (parts[0].startswith("IVF") and len(parts) == 1))


def resolve_corpus(path: str | Path) -> str:
    """A corpus path as the manifest and the store record it: absolute, links resolved, so a
    command run from another directory names the same file."""
    return str(path) if str(path) == PYDOC_CORPUS else str(Path(path).resolve())


def _spellings(recorded: str) -> list[str]:
    """How passages from a recorded corpus path may be stored: resolved (now), or as typed
    (indexes built before paths were resolved)."""
    if recorded == PYDOC_CORPUS:
        return [recorded]
    return list(dict.fromkeys([resolve_corpus(recorded), os.path.normpath(recorded)]))


def _key(manifest: Manifest, op: str, *args: Any) -> str:
    """Identifies one change of one version (a rerun after it landed is a new one)."""
    parts = [op, manifest.version, manifest.built_at, len(manifest.history), *map(str, args)]
    return op + "-" + hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def _confirm(removed: int, total: int, yes: bool, what: str) -> None:
    if not yes and removed * 2 > total:
        raise ConfigError(f"{what} (more than half); nothing was changed. See the plan with --dry-run, then "
                          "pass --yes if that is what you want")


def _finish(w: Writer, work: Path, manifest: Manifest, entry: dict[str, Any], t0: float, key: str,
            **update: Any) -> Manifest:
    with PassageStore(work / STORE_FILE) as s:
        live, deleted = len(s), len(s.deleted_rows())
    entry = {"op": entry.pop("op"), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             **entry, "seconds": round(time.time() - t0, 3), "passages": live}
    new = manifest.model_copy(update={"passages": live, "deleted": deleted, "build_key": "",
                                      "history": [*manifest.history, entry], **update})
    return finish(w, work, new, key)


def _source_ids(store: PassageStore, sources: Sequence[str]) -> list[str]:
    """Ids of the passages read from each source, the path given in any spelling that names
    the same file (relative, absolute, through links)."""
    ids: list[str] = []
    for source in sources:
        for spelling in _spellings(source):
            ids += store.ids_under(spelling)
    return ids


def plan_delete(folder: str | Path, ids: Sequence[str] = (), *, sources: Sequence[str] = ()) -> ChangePlan:
    """What `delete` would remove from the published version."""
    version, pin = open_version(folder)
    try:
        return _plan_delete(version, ids, sources)
    finally:
        if pin is not None:
            pin.release()


def _plan_delete(version: Version, ids: Sequence[str], sources: Sequence[str]) -> ChangePlan:
    with PassageStore(version.path / STORE_FILE, readonly=True) as s:
        wanted = list(dict.fromkeys([*ids, *_source_ids(s, sources)]))
        present = list(s.texts(wanted))
        total = len(s)
    return ChangePlan(op="delete", removed=len(present), removed_ids=present, stored=total)


def delete(folder: str | Path, ids: Sequence[str] = (), *, sources: Sequence[str] = (), wait: float = 0.0,
           yes: bool = False) -> Manifest:
    """Delete passages by id and/or by the corpus file they came from. Unknown ids are ignored;
    the history entry counts what was deleted."""
    t0 = time.time()
    out = Path(folder)
    if not ids and not sources:
        raise ConfigError("nothing to delete: give --ids, --ids-file or --source")
    with writing(out, "delete", wait=wait) as w:
        base = check_intact(out)
        manifest = load_manifest(base.path)
        plan = _plan_delete(base, ids, sources)
        if not plan.removed:
            w.tidy()
            return manifest  # nothing there (or a rerun after the change landed)
        _confirm(plan.removed, plan.stored, yes, f"{out}: this deletes {plan.removed} of its {plan.stored} passages")
        key = _key(manifest, "delete", sorted(plan.removed_ids))
        if (done := resume_finished(w, key)) is not None:
            return done
        work = w.work(key, copy_from=base, fresh=True)
        with PassageStore(work / STORE_FILE) as s:
            rows = s.delete(plan.removed_ids)
        return _finish(w, work, manifest, {"op": "delete", "deleted": len(rows), "sources": list(sources)}, t0, key)


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
           chunk_size: int = 100, chunk_stride: int | None = None, mode: Mode = "upsert",
           wait: float = 0.0) -> Manifest:
    """Add the corpus's new passages and replace the changed ones (re-encoding only those).

    ``mode``: ``upsert``; ``add`` (every record is new: an id already stored is an error);
    ``sync`` (an upsert that also deletes the passages read from this corpus's files earlier
    that it no longer holds, whole files included; `sync` checks how many first).
    """
    out = Path(folder)
    with writing(out, mode, wait=wait) as w:
        base = check_intact(out)
        return _upsert(w, base, corpus, format=format, embedder=embedder, batch_size=batch_size,
                       skip_bad_lines=skip_bad_lines, progress=progress, chunk_size=chunk_size,
                       chunk_stride=chunk_stride, mode=mode)


def _upsert(w: Writer, base: Version, corpus: str | Path, *, format: str, embedder: Embedder | None,
            batch_size: int, skip_bad_lines: bool, progress: bool, chunk_size: int, chunk_stride: int | None,
            mode: Mode, recorded: str | None = None) -> Manifest:
    """`upsert` under the lock; ``recorded``: the corpus as the manifest names it (sync)."""
    t0 = time.time()
    manifest = load_manifest(base.path)
    embedder = embedder or embedder_from_manifest(manifest)
    check_embedder(manifest, embedder, w.folder)
    path = resolve_corpus(corpus)
    fingerprint = corpus_fingerprint(path, format)
    key = _key(manifest, mode, path, format, fingerprint, skip_bad_lines, chunk_size, chunk_stride)
    if (done := resume_finished(w, key)) is not None:
        return done
    work = w.work(key, copy_from=base)
    counts = {"added": 0, "changed": 0, "unchanged": 0}
    seen: set[str] = set()
    report = ReadReport()
    with PassageStore(base.path / STORE_FILE, readonly=True) as original, \
            PassageStore(work / STORE_FILE) as store:
        if store.get_state("key") != key:  # a fresh copy: the state is the build's or the last change's
            store.add([], state={"key": key, "records_done": "0", "base": str(store.next_row())})
        start = int(store.get_state("base") or 0)
        records = owned(iter_records(path, format, skip_bad_lines=skip_bad_lines, report=report,
                                     chunk_size=chunk_size, chunk_stride=chunk_stride), manifest.shard)
        if mode != "add":
            records = _changed(records, original, seen, counts)
        encode_into(work, store, records, embedder, batch_size, manifest.name, key, progress,
                    add=commit if mode == "add" else _replace)
        removed: list[str] = []
        if mode == "sync":  # records gone from a file, and files gone from a directory
            removed = [i for i in _source_ids(original, [recorded or path]) if i not in seen]
            store.delete(removed)
        count = store.next_row()
    if mode == "add":
        counts["added"] = count - start
    if counts["added"] + counts["changed"] + len(removed) == 0:
        w.tidy()
        return manifest
    index = FaissIndex.load(work / INDEX_FILE, metric=manifest.metric, device="cpu")
    if index.ntotal == start:  # (== count: an interrupted run already added them)
        for vecs in Shards(work).iter(start, count):
            index.add(vecs)
        index.save(work / INDEX_FILE)
    elif index.ntotal != count:
        raise CheckpointError(f"{work / INDEX_FILE}: holds {index.ntotal} vectors, the store {start} rows; "
                              "its work folder is removed: run the same command again")
    prev = json.loads((work / REPORT_FILE).read_text()) if (work / REPORT_FILE).exists() else {}
    atomic_write_json(work / REPORT_FILE, {"corpora": prev.get("corpora", []) + [report.to_json()]})
    names = set(_spellings(recorded or path))
    corpora = [c for c in manifest.corpora if c["path"] not in names and resolve_corpus(c["path"]) != path]
    corpora.append({"path": path, "format": format, "fingerprint": fingerprint,
                    "passages": counts["added"] + counts["changed"] + counts["unchanged"],
                    "chunk_size": chunk_size, "chunk_stride": chunk_stride})
    return _finish(w, work, manifest, {"op": mode, "corpus": path, "fingerprint": fingerprint,
                                       **counts, "removed": len(removed)}, t0, key, corpora=corpora)


def add_to_index(folder: str | Path, corpus: str | Path, **kwargs: Any) -> Manifest:
    """Append a corpus without rebuilding (no retraining of IVF/PQ); ids must be new."""
    return upsert(folder, corpus, mode="add", **kwargs)


def _sync_corpora(folder: Path, manifest: Manifest) -> list[tuple[CorpusEntry, str]]:
    """The manifest's corpora whose bytes changed, each with the path to read it from."""
    out = []
    for c in manifest.corpus_entries:
        recorded = c.path
        path = resolve_corpus(recorded)
        if recorded != PYDOC_CORPUS and not Path(path).exists():
            raise ConfigError(
                f"{folder}: corpus {path} named in the manifest does not exist (moved or deleted; "
                f"{'recorded relative to the directory the build ran in; ' if recorded != path else ''}"
                "nothing was changed). Run sync where it resolves, or, if it is gone for good, remove its "
                f"passages with rag index delete {folder} --source {recorded}")
        if corpus_fingerprint(path, c.format) != c.fingerprint:
            out.append((c, path))
    return out


def _plan_sync(version: Version, manifest: Manifest, folder: Path) -> list[tuple[CorpusEntry, ChangePlan]]:
    """Per corpus whose bytes changed: its manifest entry and what syncing it would do."""
    plans = []
    with PassageStore(version.path / STORE_FILE, readonly=True) as store:
        for c, path in _sync_corpora(folder, manifest):
            counts = {"added": 0, "changed": 0, "unchanged": 0}
            seen: set[str] = set()
            records = owned(iter_records(path, c.format, chunk_size=c.chunk_size, chunk_stride=c.chunk_stride,
                                         skip_bad_lines=True), manifest.shard)
            for _ in _changed(records, store, seen, counts):
                pass
            stored = _source_ids(store, [c.path])
            removed = [i for i in stored if i not in seen]
            plans.append((c, ChangePlan(op="sync", corpus=path, **counts, removed=len(removed),
                                        removed_ids=removed, stored=len(stored))))
    return plans


def plan_sync(folder: str | Path) -> list[ChangePlan]:
    """What `sync` would do, per corpus whose bytes changed."""
    version, pin = open_version(folder)
    try:
        return [plan for _, plan in _plan_sync(version, load_manifest(version.path), Path(folder))]
    finally:
        if pin is not None:
            pin.release()


def sync(folder: str | Path, *, progress: bool = True, embedder: Embedder | None = None, wait: float = 0.0,
         yes: bool = False) -> Manifest:
    """Re-read every corpus named in the manifest and apply the difference: new and changed
    passages are (re-)encoded, passages whose record or file is gone are deleted.

    Refused without ``yes`` when a corpus would lose more than half of its passages (it looks
    like another file than the one indexed) or the index more than half of all its passages."""
    out = Path(folder)
    with writing(out, "sync", wait=wait) as w:
        base = check_intact(out)
        manifest = load_manifest(base.path)
        plans = _plan_sync(base, manifest, out)
        for _, plan in plans:
            _confirm(plan.removed, plan.stored, yes,
                     f"{plan.corpus} no longer holds {plan.removed} of the {plan.stored} passages indexed from "
                     "it: another file than the one indexed?")
        removed = sum(plan.removed for _, plan in plans)
        _confirm(removed, manifest.passages, yes,
                 f"{out}: sync would delete {removed} of its {manifest.passages} passages")
        if not plans:
            w.tidy()
        elif embedder is None:  # once, not once per corpus
            embedder = embedder_from_manifest(manifest)
        for c, _ in plans:
            manifest = _upsert(w, base, c.path, format=c.format, embedder=embedder,
                               batch_size=256, skip_bad_lines=False, progress=progress,
                               chunk_size=c.chunk_size, chunk_stride=c.chunk_stride, mode="sync", recorded=c.path)
            base = w.current or base
    return manifest


def compact(folder: str | Path, *, wait: float = 0.0) -> Manifest:
    """Drop the deleted rows' vectors: a new FAISS structure (same factory and training) filled
    with the live vectors the index holds, rows renumbered; nothing is re-encoded."""
    t0 = time.time()
    out = Path(folder)
    with writing(out, "compact", wait=wait) as w:
        base = check_intact(out)
        manifest = load_manifest(base.path)
        if manifest.deleted == 0:
            w.tidy()
            return manifest
        if not lossless(manifest.factory):
            raise ConfigError(f"{out}: {manifest.factory} stores lossy codes, so its vectors cannot be re-added "
                              "exactly; deleted rows stay skipped (searches are exact); rebuild with rag index "
                              "build to reclaim the space")
        key = _key(manifest, "compact")
        if (done := resume_finished(w, key)) is not None:
            return done
        work = w.work(key, copy_from=base, fresh=True)
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
        return _finish(w, work, manifest, {"op": "compact", "dropped": dropped}, t0, key)
