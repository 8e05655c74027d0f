"""Build checkpoints: records in batches, embedding shards, and the resume point.

A build or change works in a sibling work folder: each batch's embeddings are written as a shard
file (``emb/<first row>.npy``), then its passages and the count of records done are committed to
the store in one transaction. A crash (Ctrl-C, kill -9) loses at most the batch in flight;
running the same command again skips what was done.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from rag.corpus import Record
from rag.embedding import Embedder, passage_text
from rag.errors import CheckpointError
from rag.store import PassageStore

log = logging.getLogger(__name__)


def progress_bar(total: int | None, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="psg", file=sys.stderr, dynamic_ncols=True,
                disable=not enabled or not sys.stderr.isatty(), initial=0)


def batches(records: Iterator[Record], size: int) -> Iterator[list[Record]]:
    batch: list[Record] = []
    for rec in records:
        batch.append(rec)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def batches_after(records: Iterator[Record], size: int, done: int) -> Iterator[tuple[list[Record], int]]:
    """Batches of the records after the first ``done`` (an earlier run's), each with the count
    of records done once it is committed."""
    for batch in batches(itertools.islice(records, done, None), size):
        done += len(batch)
        yield batch, done


def commit(store: PassageStore, batch: list[Record], records_done: int, key: str) -> None:
    """Add a batch's passages (with where they came from) and the resume point in one step."""
    store.add([r.passage for r in batch], state={"records_done": str(records_done), "key": key},
              locations=[f"{r.source}:{r.line}" if r.line else r.source for r in batch],
              sources=[r.source for r in batch])


class Shards:
    """Embedding checkpoints: ``emb/<first row>.npy``, written atomically."""

    def __init__(self, folder: Path):
        self.dir = folder / "emb"
        self.dir.mkdir(parents=True, exist_ok=True)

    def write(self, start_row: int, vectors: np.ndarray) -> None:
        tmp = self.dir / f"{start_row:012d}.tmp.npy"
        np.save(tmp, vectors)
        os.replace(tmp, self.dir / f"{start_row:012d}.npy")

    def drop_from(self, row: int) -> None:
        """Delete shards at or past ``row`` (written but never committed before a crash)."""
        for f in self.dir.glob("*.npy"):
            if ".tmp" in f.name or int(f.stem) >= row:
                f.unlink()

    def iter(self, start: int, end: int) -> Iterator[np.ndarray]:
        expected = start
        for f in sorted(self.dir.glob("*.npy")):
            row = int(f.stem)
            if row < start:
                continue
            if row != expected:
                raise CheckpointError(f"embedding checkpoint for row {expected} missing in "
                                         f"{self.dir}; its work folder is removed: run the same command again")
            vecs = np.load(f)
            expected += len(vecs)
            yield vecs
        if expected != end:
            raise CheckpointError(f"embedding checkpoints cover rows {start}..{expected}, "
                                     f"store has {end}; its work folder is removed: run the same command again")

    def sample(self, start: int, end: int, n: int, seed: int = 0) -> np.ndarray:
        """A uniform sample of ``n`` vectors (all when fewer), reading one shard at a time."""
        total = end - start
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(total, size=min(n, total), replace=False))
        parts, offset = [], 0
        for vecs in self.iter(start, end):
            sel = chosen[(chosen >= offset) & (chosen < offset + len(vecs))] - offset
            parts.append(vecs[sel])
            offset += len(vecs)
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)



def encode_into(partial: Path, store: PassageStore, records: Iterator[Record], embedder: Embedder,
                batch_size: int, name: str, key: str, show: bool,
                add: Callable[[PassageStore, list[Record], int, str], None] | None = None) -> int:
    """Encode records into shards + store, resuming after what the store already holds;
    ``add`` commits a batch (default `commit`: append).

    Returns the number of records skipped because an earlier run had done them.
    """
    done = int(store.get_state("records_done") or 0)
    shards = Shards(partial)
    shards.drop_from(store.next_row())
    if done:
        log.info("resuming build: %d passages already encoded", done)
    bar = progress_bar(None, f"encoding {name}", show)
    bar.update(done)
    try:
        for batch, records_done in batches_after(records, batch_size, done):
            vecs = embedder.encode_passages([passage_text(r.passage.title, r.passage.text)
                                             for r in batch])
            shards.write(store.next_row(), vecs)
            (add or commit)(store, batch, records_done, key)
            bar.update(len(batch))
    finally:
        bar.close()
    return done

