"""PassageStore: passages in SQLite, addressed by FAISS row (0-based) and by passage id."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from rag.errors import DuplicatePassageError, IndexNotFoundError
from rag.types import Passage

_SCHEMA = """
CREATE TABLE IF NOT EXISTS passages (
    row INTEGER PRIMARY KEY,          -- FAISS id, 0-based, dense
    id TEXT NOT NULL UNIQUE,
    title TEXT NOT NULL,
    text TEXT NOT NULL,
    meta TEXT NOT NULL                -- JSON object
);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class PassageStore:
    """Random access to passages by row or id; append-only.

    Rows are dense and 0-based so row ``i`` is vector ``i`` of the index built with it.
    """

    def __init__(self, path: str | Path, *, readonly: bool = False):
        self.path = Path(path)
        if readonly and not self.path.exists():
            raise IndexNotFoundError(f"passage store not found: {self.path}")
        uri = f"file:{self.path}?mode=ro" if readonly else f"file:{self.path}"
        self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        if not readonly:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> PassageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM passages").fetchone()[0])

    def add(self, passages: Sequence[Passage], *, state: dict[str, str] | None = None,
            locations: Sequence[str] | None = None) -> range:
        """Append passages (and optional state keys) in one transaction; return their rows.

        Raises:
            DuplicatePassageError: an id already in the store or twice in ``passages``
                (naming the record's location when ``locations`` is given).
        """
        start = len(self)
        rows = [(start + i, p.id, p.title, p.text, json.dumps(p.meta, ensure_ascii=False))
                for i, p in enumerate(passages)]
        try:
            with self._db:
                self._db.executemany("INSERT INTO passages VALUES (?,?,?,?,?)", rows)
                for key, value in (state or {}).items():
                    self._db.execute("INSERT OR REPLACE INTO state VALUES (?,?)", (key, value))
        except sqlite3.IntegrityError:
            raise self._duplicate(passages, locations) from None
        return range(start, start + len(rows))

    def _duplicate(self, passages: Sequence[Passage], locations: Sequence[str] | None
                   ) -> DuplicatePassageError:
        seen: set[str] = set()
        for i, p in enumerate(passages):
            if p.id in seen or self.get(p.id) is not None:
                where = locations[i] if locations else "this batch"
                return DuplicatePassageError(
                    f"{where}: duplicate passage id {p.id!r}; ids must be unique within an index")
            seen.add(p.id)
        return DuplicatePassageError("duplicate passage id in batch")

    def get_state(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM state WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_state(self, key: str, value: str) -> None:
        with self._db:
            self._db.execute("INSERT OR REPLACE INTO state VALUES (?,?)", (key, value))

    def get(self, passage_id: str) -> Passage | None:
        row = self._db.execute(
            "SELECT id, title, text, meta FROM passages WHERE id=?", (passage_id,)).fetchone()
        return None if row is None else _passage(row)

    def get_rows(self, rows: Sequence[int]) -> list[Passage]:
        """Passages at FAISS rows, in the order given (missing rows raise KeyError)."""
        wanted = [int(r) for r in rows]
        if not wanted:
            return []
        found: dict[int, Passage] = {}
        for i in range(0, len(wanted), 900):  # SQLite caps bound variables
            chunk = wanted[i : i + 900]
            q = f"SELECT row, id, title, text, meta FROM passages WHERE row IN ({','.join('?' * len(chunk))})"
            for r in self._db.execute(q, chunk):
                found[r[0]] = _passage(r[1:])
        return [found[r] for r in wanted]

    def iter_passages(self, batch_size: int = 1000) -> Iterator[Passage]:
        last = -1
        while True:
            batch = self._db.execute(
                "SELECT row, id, title, text, meta FROM passages WHERE row > ? ORDER BY row LIMIT ?",
                (last, batch_size)).fetchall()
            if not batch:
                return
            for r in batch:
                yield _passage(r[1:])
            last = batch[-1][0]

    def rows_matching(self, where: dict[str, Any]) -> list[int]:
        """Rows whose metadata (or id/title) equals every key/value in ``where``."""
        clauses, params = [], []
        for key, value in where.items():
            if key in ("id", "title"):
                clauses.append(f"{key} = ?")
            else:
                clauses.append("json_extract(meta, ?) = ?")
                params.append(f'$."{key}"')
            params.append(value)
        q = "SELECT row FROM passages" + (" WHERE " + " AND ".join(clauses) if clauses else "")
        return [r[0] for r in self._db.execute(q, params)]


def _passage(row: Iterable[Any]) -> Passage:
    pid, title, text, meta = row
    return Passage(id=pid, title=title, text=text, meta=json.loads(meta))
