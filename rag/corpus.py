"""Corpus readers: stream passages from JSONL, FlashRAG, DPR tsv, BEIR, text directories.

Every reader is a generator: a corpus is never held in memory. Malformed records raise
`CorpusError` naming the file and line (or, with ``skip_bad_lines``, are recorded in the
`ReadReport`); records with empty text are skipped and counted.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rag.errors import CorpusError
from rag.types import Passage

FORMATS = ("auto", "jsonl", "flashrag", "dpr", "beir", "squad", "dir", "pydoc")
PYDOC_CORPUS = "pydoc_data.topics"
TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")


@dataclass
class ReadReport:
    """What a read saw: passages yielded, empty texts skipped, bad lines skipped."""

    passages: int = 0
    empty_skipped: int = 0
    bad_lines: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"passages": self.passages, "empty_skipped": self.empty_skipped,
                "bad_lines": len(self.bad_lines), "bad_line_details": self.bad_lines[:1000]}


@dataclass(frozen=True, slots=True)
class Record:
    """A passage with where it came from (for error messages)."""

    passage: Passage
    source: str
    line: int


def detect_format(path: str | Path) -> str:
    """Guess the reader from the path (and the first record of a JSONL file)."""
    if str(path) == PYDOC_CORPUS:
        return "pydoc"
    p = Path(path)
    if not p.exists():
        raise CorpusError(f"corpus not found: {p} (give a file or a directory)")
    if p.is_dir():
        return "dir"
    name = p.name.lower()
    if name.endswith(".tsv"):
        return "dpr"
    if name.endswith(".json"):
        with p.open("rb") as f:
            if b'"paragraphs"' in f.read(4096):
                return "squad"
    if name.endswith((".jsonl", ".json")):
        with p.open(encoding="utf-8", errors="replace") as f:  # the reader reports bad bytes by line
            for raw in f:
                if raw.strip():
                    try:
                        keys = json.loads(raw).keys()
                    except (json.JSONDecodeError, AttributeError):
                        return "jsonl"  # the jsonl reader reports the bad line properly
                    if "_id" in keys:
                        return "beir"
                    if "contents" in keys:
                        return "flashrag"
                    return "jsonl"
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "dir"
    raise CorpusError(
        f"cannot tell the format of {p}; pass --format one of {', '.join(FORMATS[1:])}"
    )


def chunk_words(text: str, window: int = 100, stride: int | None = None) -> Iterator[tuple[int, str]]:
    """Yield (word offset, chunk) windows of ``window`` words every ``stride`` words."""
    stride = stride or window
    if window < 1 or stride < 1:
        raise ValueError(f"chunk window and stride must be >= 1 (got {window}, {stride})")
    words = text.split()
    start = 0
    while start < len(words):
        yield start, " ".join(words[start : start + window])
        if start + window >= len(words):
            break
        start += stride


def iter_records(
    path: str | Path,
    format: str = "auto",
    *,
    chunk_size: int = 100,
    chunk_stride: int | None = None,
    skip_bad_lines: bool = False,
    report: ReadReport | None = None,
) -> Iterator[Record]:
    """Stream `Record`s from a corpus. See `read_corpus` for the arguments."""
    report = report if report is not None else ReadReport()
    fmt = detect_format(path) if format == "auto" else format
    readers: dict[str, Callable[..., Iterator[Record | CorpusError]]] = {
        "jsonl": _read_jsonl, "flashrag": _read_flashrag, "beir": _read_beir,
        "dpr": _read_dpr, "dir": _read_dir, "pydoc": _read_pydoc, "squad": _read_squad,
    }
    if fmt not in readers:
        raise CorpusError(f"unknown corpus format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt != "pydoc" and not Path(path).exists():
        raise CorpusError(f"corpus not found: {path}")
    for item in readers[fmt](Path(path), chunk_size=chunk_size, chunk_stride=chunk_stride):
        if isinstance(item, CorpusError):
            if not skip_bad_lines:
                if item.line:  # a bad record, not a bad file: say how to go on without it
                    item.args = (f"{item} (fix the line, or pass --skip-bad-lines to record "
                                 "such lines in report.json and go on)",)
                raise item
            report.bad_lines.append({"source": item.source, "line": item.line, "error": str(item)})
            continue
        if not item.passage.id.strip():
            bad = CorpusError("empty passage id; every passage needs one", source=item.source, line=item.line or None)
            if not skip_bad_lines:
                raise bad
            report.bad_lines.append({"source": item.source, "line": item.line, "error": str(bad)})
            continue
        if not item.passage.text.strip():
            report.empty_skipped += 1
            continue
        report.passages += 1
        yield item


def read_corpus(
    path: str | Path,
    format: str = "auto",
    *,
    chunk_size: int = 100,
    chunk_stride: int | None = None,
    skip_bad_lines: bool = False,
    report: ReadReport | None = None,
) -> Iterator[Passage]:
    """Stream passages from a corpus.

    Args:
        path: a file, a directory of text files, or ``pydoc_data.topics``.
        format: one of ``FORMATS``; ``auto`` looks at the suffix and the first record.
        chunk_size, chunk_stride: word windows for text directories and pydoc topics.
        skip_bad_lines: record malformed lines in ``report`` instead of raising.
        report: filled with counts as the stream is consumed.

    Raises:
        CorpusError: a malformed record (with file and line), or an unreadable corpus.
    """
    for rec in iter_records(path, format, chunk_size=chunk_size, chunk_stride=chunk_stride,
                            skip_bad_lines=skip_bad_lines, report=report):
        yield rec.passage


# --- readers: yield Record, or a CorpusError for a bad line (the caller decides) ---------


def json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any] | CorpusError]]:
    """(line number, object) per non-empty line; a bad line yields a `CorpusError` instead."""
    with path.open("rb") as f:
        for lineno, data in enumerate(f, 1):
            try:
                raw = data.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, _not_utf8(e, path, lineno)
                continue
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                yield lineno, CorpusError(
                    f"invalid JSON ({e.msg} at column {e.colno}); each line must be one JSON object",
                    source=str(path), line=lineno)
                continue
            if not isinstance(obj, dict):
                yield lineno, CorpusError(
                    f"expected a JSON object, got {type(obj).__name__}", source=str(path), line=lineno)
                continue
            yield lineno, obj


def _not_utf8(e: UnicodeDecodeError, path: Path, lineno: int) -> CorpusError:
    return CorpusError(f"not valid UTF-8 (byte {e.object[e.start]:#04x} at column {e.start + 1}); save the file "
                       "as UTF-8", source=str(path), line=lineno)


def _utf8_lines(f: Any, path: Path, bad: dict[int, CorpusError]) -> Iterator[str]:
    """The lines of a binary file as text; a line that is not UTF-8 is recorded in ``bad`` by its
    number (and passed on with replacement characters, for the csv reader to count lines)."""
    for lineno, data in enumerate(f, 1):
        try:
            yield data.decode("utf-8")
        except UnicodeDecodeError as e:
            bad[lineno] = _not_utf8(e, path, lineno)
            yield data.decode("utf-8", errors="replace")


def _field(obj: dict[str, Any], key: str, path: Path, lineno: int, hint: str) -> str:
    value = obj.get(key)
    if value is None:
        raise CorpusError(f"missing field {key!r} ({hint})", source=str(path), line=lineno)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise CorpusError(f"field {key!r} must be a string, got {type(value).__name__}",
                          source=str(path), line=lineno)
    return value


def _json_reader(
    id_key: str, make: Callable[[dict[str, Any], Path, int], tuple[str, str, dict[str, Any]]],
    hint: str,
) -> Callable[..., Iterator[Record | CorpusError]]:
    def read(path: Path, **_: Any) -> Iterator[Record | CorpusError]:
        for lineno, obj in json_lines(path):
            if isinstance(obj, CorpusError):
                yield obj
                continue
            try:
                pid = _field(obj, id_key, path, lineno, hint)
                title, text, meta = make(obj, path, lineno)
            except CorpusError as e:
                yield e
                continue
            yield Record(Passage(id=pid, title=title, text=text, meta=meta), str(path), lineno)
    return read


def _plain(obj: dict[str, Any], path: Path, lineno: int) -> tuple[str, str, dict[str, Any]]:
    hint = "this reader expects id, title, text; use --format flashrag for id, contents"
    text = _field(obj, "text", path, lineno, hint)
    title = str(obj.get("title") or "")
    meta = {k: v for k, v in obj.items() if k not in ("id", "title", "text")}
    return title, text, meta


def _flashrag(obj: dict[str, Any], path: Path, lineno: int) -> tuple[str, str, dict[str, Any]]:
    contents = _field(obj, "contents", path, lineno, "FlashRAG corpora have id, contents")
    title, _, text = contents.partition("\n")
    if len(title) >= 2 and title[0] == title[-1] == '"':
        title = title[1:-1]  # FlashRAG writes the title line in quotes
    meta = {k: v for k, v in obj.items() if k not in ("id", "contents")}
    return title, text, meta


def _beir(obj: dict[str, Any], path: Path, lineno: int) -> tuple[str, str, dict[str, Any]]:
    text = _field(obj, "text", path, lineno, "BEIR corpus lines have _id, title, text")
    meta = obj.get("metadata") or {}
    return str(obj.get("title") or ""), text, meta if isinstance(meta, dict) else {}


_read_jsonl = _json_reader("id", _plain, "this reader expects id, title, text")
_read_flashrag = _json_reader("id", _flashrag, "FlashRAG corpora have id, contents")
_read_beir = _json_reader("_id", _beir, "BEIR corpus lines have _id, title, text")


def _read_dpr(path: Path, **_: Any) -> Iterator[Record | CorpusError]:
    csv.field_size_limit(sys.maxsize)
    bad: dict[int, CorpusError] = {}
    with path.open("rb") as f:
        reader = csv.reader(_utf8_lines(f, path, bad), delimiter="\t")
        header = next(reader, None)
        if header is None:
            return
        cols = [c.strip().lower() for c in header]
        if "id" not in cols or "text" not in cols:
            yield CorpusError(f"DPR tsv header must name id, text, title; got {header}",
                              source=str(path), line=1)
            return
        i_id, i_text = cols.index("id"), cols.index("text")
        i_title = cols.index("title") if "title" in cols else None
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield CorpusError(f"bad TSV: {e}", source=str(path), line=reader.line_num)
                continue
            lineno = reader.line_num
            if lineno in bad:
                yield bad.pop(lineno)
                continue
            if not row:
                continue
            if len(row) != len(cols):
                yield CorpusError(f"expected {len(cols)} tab-separated columns {cols}, got {len(row)}",
                                  source=str(path), line=lineno)
                continue
            title = row[i_title] if i_title is not None else ""
            yield Record(Passage(id=row[i_id], title=title, text=row[i_text]), str(path), lineno)


def squad_passage_id(title: str, index: int) -> str:
    return f"{title}#{index}"


def _read_squad(path: Path, **_: Any) -> Iterator[Record | CorpusError]:
    """SQuAD v1.1 JSON: every paragraph of every article is a passage (a closed-world corpus)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        articles = data["data"]
    except UnicodeDecodeError as e:
        yield CorpusError(f"not valid UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start}); save the file "
                          "as UTF-8", source=str(path))
        return
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        yield CorpusError(f"not a SQuAD v1.1 file ({e}); expected {{'data': [{{'title', "
                          "'paragraphs': [{'context', 'qas'}]}]}}", source=str(path))
        return
    for a, article in enumerate(articles):
        title = str(article.get("title", f"article{a}"))
        for i, para in enumerate(article.get("paragraphs", [])):
            if "context" not in para:
                yield CorpusError(f"data[{a}].paragraphs[{i}] has no 'context'", source=str(path))
                continue
            yield Record(Passage(id=squad_passage_id(title, i), title=title.replace("_", " "),
                                 text=para["context"]), str(path), 0)


def _chunks(doc_id: str, title: str, text: str, source: str, chunk_size: int,
            chunk_stride: int | None, file: str | None = None) -> Iterator[Record]:
    """``source`` goes in the metadata; ``file`` (default: the same) is where the record was read."""
    for i, (offset, chunk) in enumerate(chunk_words(text, chunk_size, chunk_stride)):
        meta = {"source": source, "offset": offset}
        yield Record(Passage(id=f"{doc_id}#{i}", title=title, text=chunk, meta=meta), file or source, 0)


def _read_dir(path: Path, *, chunk_size: int, chunk_stride: int | None) -> Iterator[Record]:
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    for file in files:
        rel = file.name if file == path else file.relative_to(path).as_posix()
        text = file.read_text(encoding="utf-8", errors="replace")
        yield from _chunks(rel, file.stem, text, rel, chunk_size, chunk_stride, str(file))


def _read_pydoc(_: Path, *, chunk_size: int, chunk_stride: int | None) -> Iterator[Record]:
    from pydoc_data.topics import topics

    for topic in sorted(topics):
        yield from _chunks(topic, topic, topics[topic], f"pydoc:{topic}", chunk_size, chunk_stride)


def corpus_fingerprint(path: str | Path, format: str = "auto") -> str:
    """sha256 over the corpus bytes (file names included for directories)."""
    h = hashlib.sha256()
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "pydoc":
        from pydoc_data.topics import topics

        h.update(json.dumps(topics, sort_keys=True).encode())
        return "sha256:" + h.hexdigest()
    p = Path(path)
    files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
    for file in files:
        h.update(file.relative_to(p).as_posix().encode() if p.is_dir() else b"")
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()
