"""Sharded index folders on real parts: SciFact abstracts encoded by the packaged MiniLM, real
FAISS and bm25s, the CLI as a subprocess. A 2- and a 3-shard folder answer 50 queries with the
unsharded index's top 10 (ids and scores) in every mode, before and after the same delete and
upsert on both; each passage lives in the one shard the rule names; a following reader sees a
shard change."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rag.index import read_manifest
from rag.index.owner import current_version
from rag.index.shards import SHARDS_FILE, read_shards, shard_folders, shard_of
from rag.retriever import load_retriever, open_retriever, query_embedder
from rag.store import PassageStore
from rag.types import Hit
from tests.conftest import SHARED_DATA, run_cli

pytestmark = pytest.mark.integration
MODES = ("dense", "bm25", "hybrid")


def cli(*args: str) -> Any:
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout) if r.stdout.strip().startswith("{") else r.stdout


def same_ranking(a: list[Hit], b: list[Hit]) -> None:
    """Equal scores (float32 sums in another order differ in the last bits) and equal ids, except
    that passages tied on score may come in either order (and a tie at the cut either one)."""
    assert [h.score for h in b] == pytest.approx([h.score for h in a], rel=1e-5, abs=1e-6)
    groups: dict[float, tuple[set[str], set[str]]] = {}
    for x, y in zip(a, b, strict=True):
        key = round(x.score, 4)
        groups.setdefault(key, (set(), set()))[0].add(x.passage.id)
        groups[key][1].add(y.passage.id)
    last = round(a[-1].score, 4) if a else None
    for key, (ids_a, ids_b) in groups.items():
        assert ids_a == ids_b or key == last, (key, ids_a, ids_b)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = SHARED_DATA / "beir-scifact"
    if not base.is_dir():
        pytest.skip("../shared/data/beir-scifact is not here")
    tmp = tmp_path_factory.mktemp("shards")
    docs = [json.loads(line) for line in (base / "corpus.jsonl").read_text().splitlines()[:220]]
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs[:200]))
    queries = [json.loads(line)["text"] for line in (base / "queries.jsonl").read_text().splitlines()[:50]]
    cli("index", "build", "--corpus", str(corpus), "--format", "beir", "--out", str(tmp / "idx"), "-q")
    for k in (2, 3):
        cli("index", "shard", str(tmp / "idx"), "--shards", str(k), "--out", str(tmp / f"sh{k}"))
    return {"tmp": tmp, "docs": docs, "corpus": corpus, "queries": queries}


def compare(tmp: Path, queries: list[str]) -> None:
    encoder = query_embedder(open_retriever(tmp / "idx", "dense"))  # loaded once for every open below
    for mode in MODES:
        one = open_retriever(tmp / "idx", mode, embedder=encoder)
        want = one.search_batch(queries, 10)
        one.close()
        for k in (2, 3):
            sharded = open_retriever(tmp / f"sh{k}", mode, embedder=encoder)
            for a, b in zip(want, sharded.search_batch(queries, 10), strict=True):
                same_ranking(a, b)
            sharded.close()


def ids_by_shard(folder: Path) -> list[set[str]]:
    out = []
    for f in shard_folders(folder):
        version = current_version(f)
        assert version is not None
        with PassageStore(version.path / "passages.db", readonly=True) as s:
            out.append({p.id for p in s.iter_passages()})
    return out


def test_shards_split_by_the_rule_and_search_equals_the_unsharded_index(data: dict[str, Any]) -> None:
    tmp = data["tmp"]
    for k in (2, 3):
        parent = read_shards(tmp / f"sh{k}")
        assert parent.shards == [f"shard-{i}" for i in range(k)] and parent.factory == "Flat"
        parts = ids_by_shard(tmp / f"sh{k}")
        assert sum(len(p) for p in parts) == 200 and set().union(*parts) == {d["_id"] for d in data["docs"][:200]}
        assert all(shard_of(pid, k) == i for i, p in enumerate(parts) for pid in p)
        assert all(len(p) > 30 for p in parts)  # a real split
        info = cli("index", "info", str(tmp / f"sh{k}"))
        assert info["passages"] == 200 and len(info["shard_folders"]) == k
    compare(tmp, data["queries"])


def test_changes_go_to_the_owning_shard_and_search_still_equals(data: dict[str, Any]) -> None:
    tmp, docs = data["tmp"], data["docs"]
    gone = [d["_id"] for d in docs[:12]]
    changed = [{**d, "text": "Zebrafish hearts regenerate after injury. " + d["text"]} for d in docs[20:26]]
    extra = tmp / "extra.jsonl"
    extra.write_text("".join(json.dumps(d) + "\n" for d in changed + docs[200:220]))
    for folder in ("idx", "sh2", "sh3"):
        deleted = cli("index", "delete", str(tmp / folder), *[a for i in gone for a in ("--ids", i)])
        assert deleted["deleted"] == 12
        upserted = cli("index", "upsert", str(tmp / folder), "--corpus", str(extra), "--format", "beir", "-q")
        assert upserted["passages"] == 200 - 12 + 20
    for k in (2, 3):
        parts = ids_by_shard(tmp / f"sh{k}")
        assert not set(gone) & set().union(*parts)
        assert all(shard_of(pid, k) == i for i, p in enumerate(parts) for pid in p)
        assert cli("index", "verify", str(tmp / f"sh{k}")).strip().endswith("intact")
    compare(tmp, [*data["queries"], "zebrafish heart regeneration"])


def test_a_following_reader_sees_a_shard_change_and_the_parent_refuses_direct_writes(
        data: dict[str, Any], tmp_path: Path) -> None:
    from rag.errors import ConfigError
    from rag.index.owner import writing

    tmp, docs = data["tmp"], data["docs"]
    reader = load_retriever(tmp / "sh2", "dense")
    question = "a study of photosynthesis in moon rocks"
    before = reader.search(question, 1)[0]
    novel = tmp_path / "novel.jsonl"
    novel.write_text(json.dumps({"_id": "moon", "title": "Moon rock photosynthesis",
                                 "text": "A study of photosynthesis in moon rocks."}) + "\n")
    cli("index", "upsert", str(tmp / "sh2"), "--corpus", str(novel), "--format", "beir", "-q")
    after = reader.search(question, 1)[0]
    assert before.passage.id != "moon" and after.passage.id == "moon"
    reader.close()
    # a shard changed directly keeps the rule: it takes only the records it owns
    owner = shard_of("moon2", 2)
    other = tmp / "sh2" / f"shard-{1 - owner}"
    novel.write_text(json.dumps({"_id": "moon2", "title": "t", "text": docs[0]["text"]}) + "\n")
    before_n = read_manifest(other).passages
    cli("index", "upsert", str(other), "--corpus", str(novel), "--format", "beir", "-q")
    assert read_manifest(other).passages == before_n
    with pytest.raises(ConfigError, match="is a sharded folder"):
        with writing(tmp / "sh2", "upsert"):
            pass
    assert (tmp / "sh2" / SHARDS_FILE).is_file()
