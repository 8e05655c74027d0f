"""Sharded index folders: K ordinary index folders under one parent, each passage in exactly one.

A sharded folder::

    shards.json     the parent manifest: the shard folders, the rule, the shared embedder,
                    factory and metric, the folder it was split from (written last)
    shard-0/ ...    ordinary index folders (own writer lock, versions, readers' pins)

A passage id belongs to shard ``blake2b-64(id) mod K`` (stable across processes, machines and
Python versions). Each shard's manifest records its place (``shard``), and every change to a
shard (upsert, sync) reads only the records it owns, so a change on the parent, which goes to
each shard in turn, or on one shard directly, keeps the rule. Each shard change has the
guarantees of any index change (one writer, published whole, resumable); the shards of one
parent change one after another, so a reader may see some shards changed and others not yet,
never a passage in two shards.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from rag.corpus import Record
from rag.errors import ConfigError, IndexCorruptError, validation_message

SHARDS_FILE = "shards.json"
RULE = "blake2b-64(id) mod K"
T = TypeVar("T")


class ShardsManifest(BaseModel):
    """``shards.json``."""

    model_config = ConfigDict(extra="forbid")
    format_version: int = 1
    rule: str = RULE
    shards: list[str]
    embedder: dict[str, Any]
    factory: str
    metric: str
    source: str
    created_at: str


def shard_of(passage_id: str, k: int) -> int:
    """The shard that owns ``passage_id`` among ``k``."""
    return int.from_bytes(hashlib.blake2b(passage_id.encode("utf-8"), digest_size=8).digest(), "big") % k


def is_sharded(folder: str | Path) -> bool:
    return (Path(folder) / SHARDS_FILE).is_file()


def read_shards(folder: str | Path) -> ShardsManifest:
    path = Path(folder) / SHARDS_FILE
    try:
        return ShardsManifest.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, ValidationError) as e:
        detail = validation_message(e.errors()) if isinstance(e, ValidationError) else str(e)
        raise IndexCorruptError(f"{path}: not a shards manifest ({detail}); re-create it with rag index shard"
                                ) from None


def shard_folders(folder: str | Path) -> list[Path]:
    return [Path(folder) / name for name in read_shards(folder).shards]


def each_shard(folder: str | Path, change: Callable[[Path], T]) -> list[T]:
    """``change`` (upsert, delete, sync, compact of `rag.index`) on every shard of a sharded
    folder, in order, each under its own lock."""
    return [change(shard) for shard in shard_folders(folder)]


def owned(records: Iterator[Record], place: dict[str, Any] | None) -> Iterator[Record]:
    """The records a shard owns (all of them for an unsharded folder); ``place`` is the shard's
    manifest entry ``shard`` ({"index": i, "of": K})."""
    if not place:
        yield from records
        return
    i, k = int(place["index"]), int(place["of"])
    for r in records:
        if shard_of(r.passage.id, k) == i:
            yield r


def shard_index(source: str | Path, out: str | Path, k: int, *, wait: float = 0.0) -> ShardsManifest:
    """Split the published version of ``source`` into ``k`` shard folders under ``out`` (no
    re-encoding: each shard's FAISS structure is the source's, emptied and filled with its
    passages' vectors, so IVF shards share the source's training). Rerunning after a kill
    finishes the shards not yet written."""
    from rag.index.folder import INDEX_FILE, STORE_FILE, load_manifest
    from rag.index.owner import open_version
    from rag.index.update import lossless
    from rag.index.vectors import FaissIndex
    from rag.store import PassageStore

    source, out = Path(source), Path(out)
    if k < 2:
        raise ConfigError(f"--shards {k}: give 2 or more")
    if is_sharded(source):
        raise ConfigError(f"{source} is already sharded ({SHARDS_FILE}); shard the unsharded folder")
    if out.exists() and any(p.name != SHARDS_FILE and not p.name.startswith("shard-") for p in out.iterdir()):
        raise ConfigError(f"--out {out} holds other files; give a new or empty folder")
    version, pin = open_version(source)
    try:
        manifest = load_manifest(version.path)
        if not lossless(manifest.factory):
            raise ConfigError(f"{source}: {manifest.factory} stores lossy codes, so its vectors cannot be moved "
                              "into shards exactly; build each shard from the corpus instead")
        index = FaissIndex.load(version.path / INDEX_FILE, metric=manifest.metric, device="cpu")
        with PassageStore(version.path / STORE_FILE, readonly=True) as store:
            parts: list[list[tuple[int, Any, str | None]]] = [[] for _ in range(k)]
            for row, passage, src in store.iter_rows_with_source():
                parts[shard_of(passage.id, k)].append((row, passage, src))
        names = [f"shard-{i}" for i in range(k)]
        for i, part in enumerate(parts):
            _write_shard(out / names[i], part, index, manifest, {"index": i, "of": k, "rule": RULE,
                                                                 "source": str(source.resolve())}, wait)
    finally:
        if pin is not None:
            pin.release()
    parent = ShardsManifest(shards=names, embedder=manifest.embedder, factory=manifest.factory,
                            metric=manifest.metric, source=str(source.resolve()),
                            created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    from rag.index.folder import atomic_write_json

    atomic_write_json(out / SHARDS_FILE, parent.model_dump())
    return parent


def _write_shard(folder: Path, part: list[tuple[int, Any, str | None]], index: Any, manifest: Any,
                 place: dict[str, Any], wait: float) -> None:
    from rag.index.folder import INDEX_FILE, REPORT_FILE, STORE_FILE, atomic_write_json, finish, load_manifest
    from rag.index.owner import writing
    from rag.index.vectors import FaissIndex
    from rag.store import PassageStore

    t0 = time.time()
    key = f"shard-{place['index']}-of-{place['of']}"
    with writing(folder, "shard", wait=wait, create=True) as w:
        if w.current is not None and load_manifest(w.current.path).shard == place:
            return  # written by an earlier run
        work = w.work(key, fresh=True)
        fresh = index.faiss.clone_index(index.cpu_index)
        fresh.reset()  # keeps the IVF quantizer / training
        new = FaissIndex(fresh, metric=manifest.metric, device="cpu")
        rows = [row for row, _, _ in part]
        for j in range(0, len(rows), 65_536):
            new.add(index.vectors(rows[j: j + 65_536]))
        new.save(work / INDEX_FILE)
        with PassageStore(work / STORE_FILE) as store:
            for j in range(0, len(part), 10_000):
                chunk = part[j: j + 10_000]
                store.add([p for _, p, _ in chunk], sources=[s for _, _, s in chunk])
        atomic_write_json(work / REPORT_FILE, {"corpora": [], "sharded_from": place["source"]})
        shard = manifest.model_copy(update={
            "name": folder.name, "passages": len(part), "deleted": 0, "history": [{"op": "shard", **place}],
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "build_key": key,
            "build_seconds": round(time.time() - t0, 3), "shard": place})
        finish(w, work, shard, key)
