from __future__ import annotations

import json
from pathlib import Path

import pytest

from rag.corpus import ReadReport, chunk_words, corpus_fingerprint, detect_format, read_corpus
from rag.errors import CorpusError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(*objs: object) -> str:
    return "".join(json.dumps(o) + "\n" for o in objs)


def test_jsonl_reader_keeps_extra_fields_as_meta(tmp_path: Path) -> None:
    f = write(tmp_path / "c.jsonl", jsonl({"id": 1, "title": "T", "text": "hello", "lang": "en"},
                                          {"id": "b", "text": "world"}))
    ps = list(read_corpus(f))
    assert [(p.id, p.title, p.text, p.meta) for p in ps] == [
        ("1", "T", "hello", {"lang": "en"}), ("b", "", "world", {})]
    assert detect_format(f) == "jsonl"


def test_flashrag_reader_splits_title_line(tmp_path: Path) -> None:
    f = write(tmp_path / "f.jsonl", jsonl({"id": "0", "contents": '"Evan Morris"\nEvan L. Morris was'}))
    assert detect_format(f) == "flashrag"
    (p,) = read_corpus(f)
    assert (p.title, p.text) == ("Evan Morris", "Evan L. Morris was")


def test_beir_reader(tmp_path: Path) -> None:
    f = write(tmp_path / "corpus.jsonl", jsonl({"_id": "4983", "title": "Micro", "text": "abc",
                                                "metadata": {"year": 2001}}))
    assert detect_format(f) == "beir"
    (p,) = read_corpus(f)
    assert (p.id, p.title, p.text, p.meta) == ("4983", "Micro", "abc", {"year": 2001})


def test_dpr_reader_handles_quotes_and_header(tmp_path: Path) -> None:
    f = write(tmp_path / "psgs.tsv", 'id\ttext\ttitle\n1\t"He said ""hi"" there"\tGreeting\n2\tplain\tT2\n')
    ps = list(read_corpus(f))
    assert [(p.id, p.text, p.title) for p in ps] == [
        ("1", 'He said "hi" there', "Greeting"), ("2", "plain", "T2")]


def test_dpr_wrong_column_count_names_line(tmp_path: Path) -> None:
    f = write(tmp_path / "psgs.tsv", "id\ttext\ttitle\n1\tok\tT\n2\tmissing title\n")
    with pytest.raises(CorpusError, match=r"psgs\.tsv:3: expected 3 tab-separated columns"):
        list(read_corpus(f))


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "invalid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"id": "x", "title": "t"}', "missing field 'text'"),
    ('{"id": "x", "text": ["a"]}', "field 'text' must be a string"),
])
def test_bad_jsonl_line_is_reported_with_its_line_number(tmp_path: Path, line: str, message: str) -> None:
    f = write(tmp_path / "c.jsonl", jsonl({"id": "a", "text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(CorpusError, match=rf"c\.jsonl:3: {message}"):
        list(read_corpus(f, "jsonl"))


def test_skip_bad_lines_records_them_and_empty_texts_are_counted(tmp_path: Path) -> None:
    f = write(tmp_path / "c.jsonl", jsonl({"id": "a", "text": "one"}) + "oops\n"
              + jsonl({"id": "b", "text": "   "}, {"id": "c", "text": "three"}))
    report = ReadReport()
    ids = [p.id for p in read_corpus(f, "jsonl", skip_bad_lines=True, report=report)]
    assert ids == ["a", "c"]
    assert report.passages == 2 and report.empty_skipped == 1
    assert [(b["line"], "invalid JSON" in b["error"]) for b in report.bad_lines] == [(2, True)]


def test_empty_text_is_skipped_even_without_skip_bad_lines(tmp_path: Path) -> None:
    f = write(tmp_path / "c.jsonl", jsonl({"id": "a", "text": ""}, {"id": "b", "text": "x"}))
    report = ReadReport()
    assert [p.id for p in read_corpus(f, report=report)] == ["b"]
    assert report.empty_skipped == 1


def test_chunk_words_windows_cover_the_tail() -> None:
    text = " ".join(f"w{i}" for i in range(10))
    assert [(o, c.split()[0], len(c.split())) for o, c in chunk_words(text, 4, 3)] == [
        (0, "w0", 4), (3, "w3", 4), (6, "w6", 4)]
    assert [o for o, _ in chunk_words(text, 4)] == [0, 4, 8]
    assert list(chunk_words("", 4)) == []


def test_directory_reader_chunks_with_source_and_offset(tmp_path: Path) -> None:
    write(tmp_path / "docs" / "a.md", " ".join(f"a{i}" for i in range(250)))
    write(tmp_path / "docs" / "sub" / "b.txt", "short file")
    write(tmp_path / "docs" / "skip.bin", "not text")
    ps = list(read_corpus(tmp_path / "docs", chunk_size=100))
    assert [(p.id, p.title, p.meta["source"], p.meta["offset"]) for p in ps] == [
        ("a.md#0", "a", "a.md", 0), ("a.md#1", "a", "a.md", 100), ("a.md#2", "a", "a.md", 200),
        ("sub/b.txt#0", "b", "sub/b.txt", 0)]
    assert ps[2].text.split()[0] == "a200"


def test_pydoc_corpus_is_available_offline() -> None:
    ps = list(read_corpus("pydoc_data.topics", chunk_size=100))
    assert len(ps) > 300
    assert any(p.title == "with" for p in ps)


def test_unknown_format_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="corpus not found"):
        list(read_corpus(tmp_path / "nope.jsonl"))
    with pytest.raises(CorpusError, match="cannot tell the format"):
        detect_format(write(tmp_path / "x.parquet", "x"))


def test_fingerprint_changes_with_content(tmp_path: Path) -> None:
    f = write(tmp_path / "c.jsonl", jsonl({"id": "a", "text": "one"}))
    before = corpus_fingerprint(f)
    assert before == corpus_fingerprint(f)
    write(f, jsonl({"id": "a", "text": "two"}))
    assert corpus_fingerprint(f) != before


@pytest.mark.parametrize("suffix", ["jsonl", "tsv"])
def test_invalid_utf8_is_a_file_line_error_or_a_skipped_line(tmp_path: Path, suffix: str) -> None:
    f = tmp_path / f"c.{suffix}"
    if suffix == "jsonl":
        f.write_bytes(b'{"id": "a", "text": "fine"}\n{"id": "b", "text": "caf\xe9"}\n{"id": "c", "text": "ok"}\n')
        line = 2
    else:
        f.write_bytes(b"id\ttext\ttitle\n1\tfine\tT\n2\tcaf\xe9\tT\n3\tok\tT\n")
        line = 3
    with pytest.raises(CorpusError, match=rf"c\.{suffix}:{line}: not valid UTF-8 \(byte 0xe9 .*save the file as UTF-8"):
        list(read_corpus(f))
    report = ReadReport()
    assert [p.text for p in read_corpus(f, skip_bad_lines=True, report=report)] == ["fine", "ok"]
    assert report.bad_lines[0]["line"] == line


def test_an_empty_passage_id_is_an_error_naming_the_line(tmp_path: Path) -> None:
    f = write(tmp_path / "c.jsonl", jsonl({"id": "a", "text": "x"}, {"id": "", "text": "y"}))
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: empty passage id"):
        list(read_corpus(f))
