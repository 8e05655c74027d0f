"""PassageStore: passages in SQLite, addressed by FAISS row (0-based) and by passage id."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from rag.errors import DuplicatePassageError, IndexCorruptError, IndexNotFoundError
from rag.types import Passage

_SCHEMA = """
CREATE TABLE IF NOT EXISTS passages (
    row INTEGER PRIMARY KEY,          -- FAISS id, 0-based, dense
    id TEXT NOT NULL UNIQUE,
    title TEXT NOT NULL,
    text TEXT NOT NULL,
    meta TEXT NOT NULL,               -- JSON object
    source TEXT                       -- the corpus file it was read from (delete --source, sync)
);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS deleted (row INTEGER PRIMARY KEY);  -- vectors to skip until compaction
"""


class PassageStore:
    """Random access to passages by row or id.

    Row ``i`` is vector ``i`` of the index built with it. New passages take the next row; a
    deleted passage leaves the table (its text is gone) and its row is listed in ``deleted``
    so searches skip its vector until `compact` renumbers the rows densely.
    """

    def __init__(self, path: str | Path, *, readonly: bool = False):
        self.path = Path(path)
        if readonly and not self.path.exists():
            raise IndexNotFoundError(f"passage store not found: {self.path}")
        uri = f"file:{self.path}?mode=ro" if readonly else f"file:{self.path}"
        self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        try:
            if not readonly:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA secure_delete=ON")  # a deleted passage's text is overwritten
                self._db.executescript(_SCHEMA)
            tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise IndexCorruptError(f"{self.path}: SQLite cannot read it ({e}); the index folder is "
                                    "damaged: rebuild it or restore it from a copy") from None
        if "passages" not in tables:
            self._db.close()
            raise IndexCorruptError(f"{self.path}: no passages table; not a rag passage store")
        self._has_deleted = "deleted" in tables  # stores written before deletes existed lack it
        if not readonly and "source" not in {r[1] for r in self._db.execute("PRAGMA table_info(passages)")}:
            with self._db:
                self._db.execute("ALTER TABLE passages ADD COLUMN source TEXT")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> PassageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM passages").fetchone()[0])

    def next_row(self) -> int:
        """The row the next passage gets (past every live and deleted row)."""
        q = "SELECT MAX(row) FROM passages" + (" UNION ALL SELECT MAX(row) FROM deleted" if self._has_deleted else "")
        rows = [r[0] for r in self._db.execute(q) if r[0] is not None]
        return max(rows) + 1 if rows else 0

    def deleted_rows(self) -> list[int]:
        if not self._has_deleted:
            return []
        return [r[0] for r in self._db.execute("SELECT row FROM deleted ORDER BY row")]

    def ids_under(self, path: str) -> list[str]:
        """Ids of the passages read from the corpus file ``path`` or from files under the
        directory ``path``."""
        if "source" not in {r[1] for r in self._db.execute("PRAGMA table_info(passages)")}:
            raise IndexNotFoundError(f"{self.path} was built before passages recorded their source "
                                     "file; rebuild the index to delete or sync by source")
        prefix = path.rstrip("/") + "/"
        q = "SELECT id FROM passages WHERE source = ? OR substr(source, 1, ?) = ? ORDER BY row"
        return [r[0] for r in self._db.execute(q, (path, len(prefix), prefix))]

    def texts(self, ids: Sequence[str]) -> dict[str, tuple[str, str, str]]:
        """(title, text, meta JSON) of the stored ``ids`` that exist."""
        out: dict[str, tuple[str, str, str]] = {}
        for i in range(0, len(ids), 900):
            chunk = list(ids[i: i + 900])
            q = f"SELECT id, title, text, meta FROM passages WHERE id IN ({','.join('?' * len(chunk))})"
            out.update({r[0]: (r[1], r[2], r[3]) for r in self._db.execute(q, chunk)})
        return out

    def live_rows(self) -> list[int]:
        return [r[0] for r in self._db.execute("SELECT row FROM passages ORDER BY row")]

    def _tombstone(self, ids: Sequence[str]) -> list[int]:
        """Inside a transaction: move the rows of ``ids`` to ``deleted``; return them."""
        rows: list[int] = []
        for i in range(0, len(ids), 900):
            chunk = list(ids[i: i + 900])
            marks = ",".join("?" * len(chunk))
            rows += [r[0] for r in self._db.execute(f"SELECT row FROM passages WHERE id IN ({marks})", chunk)]
            self._db.execute(f"DELETE FROM passages WHERE id IN ({marks})", chunk)
        self._db.executemany("INSERT INTO deleted VALUES (?)", [(r,) for r in rows])
        return sorted(rows)

    def delete(self, ids: Sequence[str], *, state: dict[str, str] | None = None) -> list[int]:
        """Delete passages by id (unknown ids are ignored) in one transaction; return their rows."""
        with self._db:
            rows = self._tombstone(ids)
            self._set(state)
        return rows

    def compact(self) -> None:
        """Renumber the live rows 0..n-1 in row order, forget the deleted rows, reclaim space."""
        with self._db:
            self._db.execute("CREATE TABLE passages_new (row INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, "
                             "title TEXT NOT NULL, text TEXT NOT NULL, meta TEXT NOT NULL, source TEXT)")
            self._db.execute("INSERT INTO passages_new SELECT ROW_NUMBER() OVER (ORDER BY row) - 1, "
                             "id, title, text, meta, source FROM passages")
            self._db.execute("DROP TABLE passages")
            self._db.execute("ALTER TABLE passages_new RENAME TO passages")
            self._db.execute("DELETE FROM deleted")
        self._db.execute("VACUUM")

    def _set(self, state: dict[str, str] | None) -> None:
        for key, value in (state or {}).items():
            self._db.execute("INSERT OR REPLACE INTO state VALUES (?,?)", (key, value))

    def add(self, passages: Sequence[Passage], *, state: dict[str, str] | None = None,
            locations: Sequence[str] | None = None, sources: Sequence[str | None] | None = None,
            replace: bool = False) -> range:
        """Append passages (and optional state keys) in one transaction; return their rows.
        ``replace``: passages whose id is already stored replace it (the old row is deleted).

        Raises:
            DuplicatePassageError: an id already in the store or twice in ``passages``
                (naming the record's location when ``locations`` is given).
        """
        start = self.next_row()
        rows = [(start + i, p.id, p.title, p.text, json.dumps(p.meta, ensure_ascii=False),
                 sources[i] if sources else None) for i, p in enumerate(passages)]
        try:
            with self._db:
                if replace:
                    self._tombstone([p.id for p in passages])
                self._db.executemany("INSERT INTO passages (row, id, title, text, meta, source) "
                                     "VALUES (?,?,?,?,?,?)", rows)
                self._set(state)
        except sqlite3.IntegrityError:
            raise self._duplicate(passages, locations, replace) from None
        return range(start, start + len(rows))

    def _duplicate(self, passages: Sequence[Passage], locations: Sequence[str] | None,
                   replace: bool = False) -> DuplicatePassageError:
        seen: set[str] = set()
        for i, p in enumerate(passages):
            if p.id in seen or (not replace and self.get(p.id) is not None):
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
        for _, p in self.iter_rows(batch_size):
            yield p

    def iter_rows(self, batch_size: int = 1000) -> Iterator[tuple[int, Passage]]:
        """(row, passage) of every live passage, in row order."""
        for row, passage, _ in self.iter_rows_with_source(batch_size):
            yield row, passage

    def iter_rows_with_source(self, batch_size: int = 1000) -> Iterator[tuple[int, Passage, str | None]]:
        """(row, passage, the corpus it was read from) of every live passage, in row order."""
        last = -1
        while True:
            batch = self._db.execute(
                "SELECT row, id, title, text, meta, source FROM passages WHERE row > ? ORDER BY row LIMIT ?",
                (last, batch_size)).fetchall()
            if not batch:
                return
            for r in batch:
                yield r[0], _passage(r[1:5]), r[5]
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
