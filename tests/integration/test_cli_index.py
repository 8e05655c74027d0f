"""The ``rag`` CLI as a subprocess: index build/info/add, search, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.integration


def test_index_build_info_search_add(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "cats.md").write_text("Cats are small domesticated carnivorous mammals that purr. " * 5)
    (docs / "rockets.txt").write_text("Rockets use liquid oxygen and kerosene as propellants. " * 5)
    out = tmp_path / "idx"
    r = run_cli("index", "build", "--corpus", str(docs), "--out", str(out), "--embedder", "hash:64", "-q")
    assert r.returncode == 0, r.stderr
    built = json.loads(r.stdout)
    assert built["passages"] == 2 and built["bytes"] > 0

    info = json.loads(run_cli("index", "info", str(out)).stdout)
    assert info["passages"] == 2 and info["embedder"]["name"] == "hash:64"
    assert info["report"]["corpora"][0]["passages"] == 2

    r = run_cli("search", str(out), "what propellants do rockets use", "-k", "2", "--json")
    assert r.returncode == 0, r.stderr
    hits = json.loads(r.stdout)
    assert [h["rank"] for h in hits] == [1, 2]
    assert hits[0]["id"] == "rockets.txt#0" and hits[0]["title"] == "rockets"
    assert set(hits[0]) >= {"id", "title", "text", "score", "rank"}

    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"id": "x1", "title": "Dogs", "text": "Dogs bark loudly at night"}) + "\n")
    assert run_cli("index", "add", str(out), "--corpus", str(extra), "-q").returncode == 0
    r = run_cli("search", str(out), "dogs bark", "-k", "1", "--json", "--mode", "bm25")
    assert json.loads(r.stdout)[0]["id"] == "x1"
    r = run_cli("search", str(out), "dogs bark", "-k", "3", "--json", "--filter", "source=cats.md")
    assert [h["id"] for h in json.loads(r.stdout)] == ["cats.md#0"]


def test_recipe_build_with_packaged_encoder(tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(
        ["The Eiffel Tower is in Paris.", "Photosynthesis converts light into chemical energy.",
         "The Nile is a river in Africa."])))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\ncorpus: {corpus}\nout: {tmp_path / 'r'}\nfactory: HNSW16\n")
    r = run_cli("index", "build", str(recipe), "-q")
    assert r.returncode == 0, r.stderr
    r = run_cli("search", str(tmp_path / "r"), "how do plants make energy from sunlight", "-k", "1", "--json")
    assert json.loads(r.stdout)[0]["id"] == "1"


@pytest.mark.parametrize(("args", "message"), [
    (["search", "/nonexistent/idx", "q"], "no index at /nonexistent/idx"),
    (["index", "build"], "give a recipe"),
    (["index", "build", "--corpus", "/nope.jsonl", "--out", "/tmp/x"], "corpus not found: /nope.jsonl"),
    (["index", "build", "--corpus", "pydoc_data.topics", "--factory", "Bogus", "--embedder", "hash:8",
      "--out", "/tmp/rag-bogus"], "invalid FAISS factory string 'Bogus'"),
])
def test_errors_are_one_line_without_traceback(args: list[str], message: str) -> None:
    r = run_cli(*args)
    assert r.returncode == 1
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("args", "message"), [
    (["index", "build", "--corpus", "c.jsonl", "--ray", "--ray-window", "0"], "Invalid value for '--ray-window'"),
    (["search", "--bogus"], "No such option: --bogus"),
])
def test_usage_errors_name_the_option_without_traceback(args: list[str], message: str) -> None:
    r = run_cli(*args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_bad_corpus_line_names_file_and_line(tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "a", "text": "ok"}\n{"id": "b", "text": }\n')
    r = run_cli("index", "build", "--corpus", str(corpus), "--out", str(tmp_path / "i"), "--embedder", "hash:8")
    assert r.returncode == 1 and f"{corpus}:2: invalid JSON" in r.stderr
    r = run_cli("index", "build", "--corpus", str(corpus), "--out", str(tmp_path / "i"),
                "--embedder", "hash:8", "--skip-bad-lines", "-q")
    assert r.returncode == 0, r.stderr
    info = json.loads(run_cli("index", "info", str(tmp_path / "i")).stdout)
    assert info["passages"] == 1 and info["report"]["corpora"][0]["bad_lines"] == 1


def test_debug_shows_traceback() -> None:
    r = run_cli("--debug", "search", "/nonexistent/idx", "q")
    assert r.returncode != 0 and "Traceback" in r.stderr
