"""Living indexes: delete / upsert / sync / compact equal a fresh build of the resulting corpus,
survive kill -9 at each step, and damaged folders are named, not tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rag.config import IndexRecipe
from rag.corpus import corpus_fingerprint, iter_records
from rag.embedding import HashingEmbedder
from rag.errors import ConfigError, IndexCorruptError
from rag.index import (
    FaissIndex,
    NumpyFlatIndex,
    build_index,
    compact,
    delete,
    plan_sync,
    read_manifest,
    sync,
    upsert,
    verify,
)
from rag.retriever import BM25Retriever, DenseRetriever, HybridRetriever, load_retriever
from rag.store import PassageStore

WORDS = [f"w{j}" for j in range(300)]  # enough words that no two passages tie on BM25
QUERIES = ["w1 w2 w3 w4 w5", "w10 w11 item7", "w20 item33 w21", "w100 w200 w250 w7", "w42 item61"]
FACTORIES = ["Flat", "IVF4,Flat", "HNSW16"]


class Seeded(HashingEmbedder):
    """Random unit vectors seeded by the text: continuous, so no two passages tie on score."""

    def _vec(self, texts: Any) -> np.ndarray:
        import hashlib

        out = [np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:12], 16)).standard_normal(self.dim)
               for t in texts]
        v = np.asarray(out, np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def encode_passages(self, texts: Any) -> np.ndarray:
        return self._vec(texts)

    def encode_queries(self, texts: Any) -> np.ndarray:
        return self._vec(texts)


def record(i: int, variant: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(1000 * variant + i)
    return {"id": f"p{i}", "title": f"doc {i}", "text": " ".join(rng.choice(WORDS, size=12)) + f" item{i}",
            "group": "even" if i % 2 == 0 else "odd"}


def write(path: Path, recs: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def build(corpus: Path, out: Path, factory: str) -> None:
    build_index(IndexRecipe(name="t", corpus=str(corpus), out=str(out), embedder="hash:32", batch_size=16,
                            factory=factory, train_size=64), embedder=Seeded(32), progress=False)


def results(folder: Path) -> list[Any]:
    """Every search mode's (id, score) lists for QUERIES, exhaustive search breadth."""
    dense = DenseRetriever.from_folder(folder, embedder=Seeded(32), nprobe=4, ef_search=256)
    bm25 = BM25Retriever(folder)
    out: list[Any] = []
    for r in (dense, bm25, HybridRetriever(dense, bm25)):
        for flt in (None, {"group": "even"}):
            out.append([[(h.passage.id, round(h.score, 4), h.passage.text) for h in hits]
                        for hits in r.search_batch(QUERIES, 8, filter=flt)])
    return out


def resulting(base: list[dict[str, Any]], gone: set[str], changes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The corpus an index holds after deleting ``gone`` and upserting ``changes``, in row order
    (a changed passage moves to the end), so BM25's ties break the same way in a fresh build."""
    new = {r["id"]: r for r in changes}
    old = {r["id"]: r for r in base}
    moved = [r for r in changes if old.get(r["id"]) != r]
    return [r for r in base if r["id"] not in gone and new.get(r["id"], r) == r] + moved


def assert_same(a: Path, b: Path) -> None:
    ra, rb = results(a), results(b)
    for x, y in zip(ra, rb, strict=True):
        for hx, hy in zip(x, y, strict=True):
            assert [h[0] for h in hx] == [h[0] for h in hy]
            np.testing.assert_allclose([h[1] for h in hx], [h[1] for h in hy], atol=2e-4)
            assert [h[2] for h in hx] == [h[2] for h in hy]


@pytest.mark.parametrize("factory", FACTORIES)
def test_delete_upsert_compact_equal_a_fresh_build(tmp_path: Path, factory: str) -> None:
    base = [record(i) for i in range(60)]
    build(write(tmp_path / "a.jsonl", base), tmp_path / "idx", factory)
    gone = ["p3", "p7", "p10", "p11", "p12", "p33"]
    m = delete(tmp_path / "idx", gone)
    assert (m.passages, m.deleted, m.history[-1]["op"], m.history[-1]["deleted"]) == (54, 6, "delete", 6)

    class Counting(Seeded):
        texts: list[str] = []

        def encode_passages(self, texts: Any) -> np.ndarray:
            Counting.texts += list(texts)
            return super().encode_passages(texts)

    changes = [record(20, variant=1), record(21, variant=1), record(22), *(record(i) for i in range(60, 65))]
    m = upsert(tmp_path / "idx", write(tmp_path / "b.jsonl", changes), embedder=Counting(32), progress=False)
    assert len(Counting.texts) == 2 + 5  # the two changed and five new passages, not p22
    assert {k: m.history[-1][k] for k in ("added", "changed", "unchanged")} == {"added": 5, "changed": 2,
                                                                               "unchanged": 1}
    expected = resulting(base, set(gone), changes)
    write(tmp_path / "fresh.jsonl", expected)
    build(tmp_path / "fresh.jsonl", tmp_path / "ref", factory)
    assert_same(tmp_path / "idx", tmp_path / "ref")
    with PassageStore(tmp_path / "idx" / "passages.db", readonly=True) as s:
        assert all(s.get(i) is None for i in gone) and len(s) == len(expected) == m.passages
    raw = (tmp_path / "idx" / "passages.db").read_bytes()
    assert record(3)["text"].encode() not in raw and record(20)["text"].encode() not in raw  # text is gone

    m = compact(tmp_path / "idx")
    assert m.deleted == 0 and m.history[-1] == {**m.history[-1], "op": "compact", "dropped": 6 + 2}
    assert FaissIndex.load(tmp_path / "idx" / "index.faiss").ntotal == len(expected)
    assert_same(tmp_path / "idx", tmp_path / "ref")
    assert verify(tmp_path / "idx") == []


def words(n: int, seed: int) -> str:
    return " ".join(np.random.default_rng(seed).choice(WORDS, size=n))


def test_sync_applies_added_changed_removed_records_and_files(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text(words(250, 1))  # chunks a.md#0..2 (100 words each)
    (docs / "b.md").write_text(words(150, 2))
    build(docs, tmp_path / "idx", "Flat")
    assert sync(tmp_path / "idx", progress=False, embedder=Seeded(32)).history == []  # nothing changed: nothing done
    before = {r.passage.id: r.passage for r in iter_records(docs)}
    (docs / "a.md").write_text(words(100, 1).rsplit(" ", 0)[0] + " " + words(80, 3))  # #0 same, #1 changed, #2 gone
    (docs / "b.md").unlink()
    (docs / "c.md").write_text(words(120, 4))
    with pytest.raises(ConfigError, match=r"no longer holds 3 of the 5 passages .*--dry-run.*--yes"):
        sync(tmp_path / "idx", progress=False, embedder=Seeded(32))  # more than half of docs/: asks first
    plan = plan_sync(tmp_path / "idx")
    assert [(p.added, p.changed, p.unchanged, p.removed) for p in plan] == [(2, 1, 1, 3)]
    m = sync(tmp_path / "idx", progress=False, embedder=Seeded(32), yes=True)
    entry = m.history[-1]
    assert {k: entry[k] for k in ("op", "added", "changed", "unchanged", "removed")} == {
        "op": "sync", "added": 2, "changed": 1, "unchanged": 1, "removed": 3}
    after = [r.passage for r in iter_records(docs)]
    assert after[0] == before["a.md#0"]
    as_json = [{"id": p.id, "title": p.title, "text": p.text, **p.meta} for p in after]
    build(write(tmp_path / "fresh.jsonl", resulting(as_json[:1], set(), as_json[1:2]) + as_json[2:]),
          tmp_path / "ref", "Flat")
    assert_same(tmp_path / "idx", tmp_path / "ref")
    assert m.corpora[0]["fingerprint"] == corpus_fingerprint(docs)
    m2 = delete(tmp_path / "idx", sources=[str(docs / "c.md")])
    assert m2.passages == m.passages - 2
    with PassageStore(tmp_path / "idx" / "passages.db", readonly=True) as s:
        assert [p.id for p in s.iter_passages()] == ["a.md#0", "a.md#1"]


CRASH = """
import os, sys
import rag.index.owner as owner, rag.index.update as update
from rag.config import IndexRecipe
from rag.index import build_index
sys.path.insert(0, sys.argv[5])
from test_index_update import Seeded as HashingEmbedder
op, where, idx, corpus = sys.argv[1:5]

class Crashing(HashingEmbedder):
    calls = 0
    def encode_passages(self, texts):
        Crashing.calls += 1
        if where == "encoding" and Crashing.calls == 2:
            os._exit(9)
        return super().encode_passages(texts)

def die(*a, **k):
    os._exit(9)

if where == "before-publish":  # the work folder is finished, manifest and all
    owner.Writer.publish = die
if where == "before-swap":  # renamed to versions/v<N>, `current` not swapped yet
    owner.Writer.make_current = die
if where == "after-swap":  # published; the old version (with the removed texts) not yet removed
    owner.Writer.collect = die
if op == "upsert":
    update.upsert(idx, corpus, embedder=Crashing(32), batch_size=4, progress=False)
elif op == "delete":
    update.delete(idx, ["p1", "p2", "p30"])
elif op == "sync":
    update.sync(idx, embedder=Crashing(32), progress=False)
elif op == "compact":
    update.compact(idx)
else:
    build_index(IndexRecipe(name="t", corpus=corpus, out=idx, embedder="hash:32", batch_size=4),
                embedder=Crashing(32), progress=False, force=True)
"""

KILLS = [("upsert", "encoding"), ("upsert", "before-publish"), ("upsert", "before-swap"), ("upsert", "after-swap"),
         ("delete", "before-publish"), ("delete", "before-swap"), ("delete", "after-swap"),
         ("compact", "before-swap"), ("compact", "after-swap"), ("sync", "before-swap"), ("sync", "after-swap"),
         ("build", "before-swap"), ("first-build", "before-publish"), ("first-build", "encoding")]


def files_under(folder: Path) -> list[Path]:
    return [Path(root) / f for root, _, names in os.walk(folder) for f in names
            if not (Path(root) / f).is_symlink()]


@pytest.mark.parametrize(("op", "where"), KILLS)
def test_kill_9_loses_nothing_and_a_rerun_finishes_the_change(tmp_path: Path, op: str, where: str) -> None:
    base = [record(i) for i in range(40)]
    idx, corpus = tmp_path / "idx", write(tmp_path / "a.jsonl", base)
    if op != "first-build":
        build(corpus, idx, "Flat")
    changes = write(tmp_path / "b.jsonl", [record(5, variant=1), *(record(i) for i in range(40, 52))])
    if op == "compact":
        delete(idx, ["p1", "p2", "p30"])
    if op == "sync":  # the indexed file itself changes: p5 edited, p6 gone, p40.. new
        write(corpus, [record(5, variant=1)] + [r for r in base if r["id"] not in ("p5", "p6")]
              + [record(i) for i in range(40, 52)])
    before = results(idx) if op != "first-build" else None
    arg = str(changes) if op in ("upsert", "first-build", "build") else str(corpus)
    proc = subprocess.run([sys.executable, "-c", CRASH, op, where, str(idx), arg, str(Path(__file__).parent)])
    assert proc.returncode == 9
    if before is not None:  # a reader sees the old index or the new one, whole
        assert verify(idx) == []
        now = results(idx)
        if where != "after-swap":
            assert now == before
    # the same command again finishes the change
    gone: set[str] = set()
    if op == "upsert":
        upsert(idx, changes, embedder=Seeded(32), batch_size=4, progress=False)
        expected = resulting(base, set(), list(map(json.loads, changes.read_text().splitlines())))
    elif op == "delete":
        delete(idx, ["p1", "p2", "p30"])
        gone = {"p1", "p2", "p30"}
        expected = resulting(base, gone, [])
    elif op == "sync":
        sync(idx, embedder=Seeded(32), progress=False)
        gone = {"p6"}
        expected = resulting(base, gone, [record(5, variant=1), *(record(i) for i in range(40, 52))])
    elif op == "compact":
        compact(idx)
        expected = resulting(base, {"p1", "p2", "p30"}, [])
        assert read_manifest(idx).deleted == 0
    else:
        build_index(IndexRecipe(name="t", corpus=str(changes), out=str(idx), embedder="hash:32", batch_size=16),
                    embedder=Seeded(32), progress=False, force=True)
        expected = list(map(json.loads, changes.read_text().splitlines()))
    assert verify(idx) == []
    assert not (idx / ".work").exists() and len(list((idx / "versions").iterdir())) == 1  # nothing left behind
    old_texts = [r["text"].encode() for r in base if r["id"] in gone or (r["id"] == "p5" and op != "delete")]
    if op in ("delete", "sync", "upsert"):
        assert not [f for f in files_under(idx) for t in old_texts if t in f.read_bytes()]
    build(write(tmp_path / "fresh.jsonl", expected), tmp_path / "ref", "Flat")
    assert_same(idx, tmp_path / "ref")


def test_damaged_folders_are_one_line_errors_naming_the_file(tmp_path: Path) -> None:
    build(write(tmp_path / "a.jsonl", [record(i) for i in range(30)]), tmp_path / "idx", "Flat")
    idx = tmp_path / "idx" / "index.faiss"
    data = idx.read_bytes()
    idx.write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexCorruptError, match=r"index\.faiss: \d+ bytes, the manifest recorded .*rag index verify"):
        DenseRetriever.from_folder(tmp_path / "idx")
    problems = verify(tmp_path / "idx")
    assert len(problems) == 1 and "index.faiss" in problems[0]
    idx.write_bytes(b"XXXX" + data[4:])  # same size, a header FAISS does not know
    assert "sha256 differs" in verify(tmp_path / "idx")[0]
    with pytest.raises(IndexCorruptError, match=r"index\.faiss: FAISS cannot read it .*rebuild it"):
        DenseRetriever.from_folder(tmp_path / "idx", embedder=Seeded(32))
    idx.write_bytes(data)
    db = tmp_path / "idx" / "passages.db"
    raw = bytearray(db.read_bytes())
    raw[:16] = b"not a database!!"
    db.write_bytes(bytes(raw))
    with pytest.raises(IndexCorruptError, match=r"passages\.db: SQLite cannot read it"):
        DenseRetriever.from_folder(tmp_path / "idx")
    (tmp_path / "idx" / "manifest.json").write_text("{")
    with pytest.raises(IndexCorruptError, match=r"manifest\.json: not a valid manifest"):
        read_manifest(tmp_path / "idx")


def test_cli_delete_verify_and_a_damaged_search(tmp_path: Path) -> None:
    build(write(tmp_path / "a.jsonl", [record(i) for i in range(30)]), tmp_path / "idx", "Flat")
    (tmp_path / "ids.txt").write_text("p4\np5\n")

    def rag(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "rag.cli", *args], capture_output=True, text=True)

    out = rag("index", "delete", str(tmp_path / "idx"), "--ids", "p3", "--ids-file", str(tmp_path / "ids.txt"))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["deleted"] == 3
    ok = rag("index", "verify", str(tmp_path / "idx"))
    assert ok.returncode == 0 and "intact" in ok.stdout
    db = tmp_path / "idx" / "passages.db"
    db.write_bytes(db.read_bytes()[:-100])
    bad = rag("index", "verify", str(tmp_path / "idx"))
    assert bad.returncode == 1 and "passages.db" in bad.stdout
    search = rag("search", str(tmp_path / "idx"), "w1 w2")
    assert search.returncode != 0 and "Traceback" not in search.stderr
    assert "passages.db" in search.stderr and "rag index verify" in search.stderr


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_numpy_flat_index_equals_faiss_with_rows_and_exclusions(metric: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    xb, xq = rng.standard_normal((200, 12)).astype(np.float32), rng.standard_normal((5, 12)).astype(np.float32)
    f = FaissIndex.create(12, "Flat", metric, device="cpu")
    f.add(xb)
    n = NumpyFlatIndex(xb, metric=metric)
    n.save(tmp_path / "v.npy")
    n = NumpyFlatIndex.load(tmp_path / "v.npy", metric=metric)
    excl = rng.choice(200, 40, replace=False)
    rows = rng.choice(200, 30, replace=False)
    for kw in ({}, {"exclude": excl}, {"rows": rows}, {"rows": rows, "exclude": excl}):
        (fs, fi), (ns, ni) = f.search(xq, 10, **kw), n.search(xq, 10, **kw)
        assert np.array_equal(fi, ni)
        np.testing.assert_allclose(fs, ns, rtol=1e-4, atol=1e-4)
        assert not set(fi.ravel()) & set(kw.get("exclude", []))
    np.testing.assert_array_equal(f.vectors([3, 7]), n.vectors([3, 7]))


def test_a_dense_retriever_over_any_vector_index(tmp_path: Path) -> None:
    build(write(tmp_path / "a.jsonl", [record(i) for i in range(30)]), tmp_path / "idx", "Flat")
    delete(tmp_path / "idx", ["p4"])
    folder = DenseRetriever.from_folder(tmp_path / "idx", embedder=Seeded(32))
    vecs = folder.index.vectors(list(range(30)))
    over_numpy = DenseRetriever(folder.embedder, NumpyFlatIndex(vecs), PassageStore(tmp_path / "idx" / "passages.db",
                                                                                    readonly=True))
    for q in QUERIES:
        a, b = folder.search(q, 6), over_numpy.search(q, 6)
        assert [h.passage.id for h in a] == [h.passage.id for h in b] and "p4" not in [h.passage.id for h in b]


def test_a_folder_of_the_old_layout_is_read_and_takes_the_new_one_at_its_next_change(tmp_path: Path) -> None:
    import shutil

    base = [record(i) for i in range(30)]
    build(write(tmp_path / "a.jsonl", base), tmp_path / "new", "Flat")
    old = tmp_path / "old"  # what builds wrote before versions: the files directly in the folder
    old.mkdir()
    for name in ("index.faiss", "passages.db", "manifest.json", "report.json"):
        shutil.copyfile(tmp_path / "new" / "current" / name, old / name)
    assert verify(old) == [] and results(old) == results(tmp_path / "new")
    follower = load_retriever(old, "dense", embedder=Seeded(32))
    assert follower.version is not None and follower.version.number == 0
    delete(old, ["p3"])
    assert os.readlink(old / "current") == "versions/v000001" and (old / "index.faiss").is_symlink()
    assert not (old / "bm25").exists() and verify(old) == []
    assert "p3" not in [h.passage.id for h in follower.search(record(3)["text"], 30)]  # followed the change
    delete(tmp_path / "new", ["p3"])
    assert results(old) == results(tmp_path / "new")
