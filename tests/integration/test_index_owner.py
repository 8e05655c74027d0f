"""An index folder has one owner: writers in separate processes never lose or mix passages,
readers see one version whatever lands meanwhile, corpora are named by resolved path, damaged
folders are never changed, and a running ``rag serve`` follows changes. Real processes, real
FAISS and SQLite; the hashing encoder (the encoder is not what is tested here)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rag.embedding import passage_text
from rag.index import read_manifest, verify
from rag.index.owner import writing
from rag.retriever import DenseRetriever
from tests.integration.servers import server_process

pytestmark = pytest.mark.integration
RAG = str(Path(sys.executable).with_name("rag"))
WORDS = [f"w{j}" for j in range(500)]


def records(ids: range, variant: int = 0) -> list[dict[str, Any]]:
    out = []
    for i in ids:
        rng = np.random.default_rng(10_000 * variant + i)
        out.append({"id": f"p{i}", "title": f"doc {i}", "text": " ".join(rng.choice(WORDS, 16)) + f" item{i}"})
    return out


def write(path: Path, recs: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def rag(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([RAG, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([RAG, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def build(corpus: Path, out: Path, cwd: Path | None = None) -> None:
    r = rag("index", "build", "--corpus", str(corpus), "--out", str(out), "--embedder", "hash:64", "-q", cwd=cwd)
    assert r.returncode == 0, r.stderr


def assert_whole(idx: Path) -> dict[str, str]:
    """Every live passage's stored vector is its own text's; manifest = store = FAISS counts.
    Returns the live passages' texts by id."""
    assert verify(idx) == []
    r = DenseRetriever.from_folder(idx)
    m = read_manifest(idx)
    rows = r.store.live_rows()
    passages = r.store.get_rows(rows)
    assert len(rows) == m.passages and r.index.ntotal == m.passages + m.deleted
    stored = r.index.vectors(rows)
    fresh = r.embedder.encode_passages([passage_text(p.title, p.text) for p in passages])
    wrong = [p.id for p, a, b in zip(passages, stored, fresh, strict=True) if not np.allclose(a, b, atol=1e-5)]
    assert not wrong, f"{len(wrong)} live rows hold another passage's vector: {wrong[:5]}"
    for p in passages[:: max(1, len(passages) // 25)]:  # and a passage's own text finds it first
        assert r.search(passage_text(p.title, p.text), 1)[0].passage.id == p.id
    r.close()
    return {p.id: p.text for p in passages}


def tree(folder: Path) -> dict[str, str]:
    """Every file's sha256 and every link's target under ``folder``."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if (Path(root) / d).is_symlink()]:
            p = Path(root) / name
            rel = str(p.relative_to(folder))
            out[rel] = "-> " + os.readlink(p) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


PAIRS = {
    "upsert-upsert": (["upsert", "{idx}", "--corpus", "{b}"], ["upsert", "{idx}", "--corpus", "{c}"]),
    "upsert-delete": (["upsert", "{idx}", "--corpus", "{b}"], ["delete", "{idx}", "--ids", "p1", "--ids", "p2"]),
    "sync-compact": (["sync", "{idx}"], ["compact", "{idx}"]),
}


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("wait", [True, False])
def test_two_writer_processes_on_one_folder(tmp_path: Path, pair: str, wait: bool) -> None:
    a = write(tmp_path / "a.jsonl", records(range(300)))
    idx = tmp_path / "idx"
    build(a, idx)
    rag("index", "delete", str(idx), "--ids", "p7", "--ids", "p8")  # something for compact to drop
    b = write(tmp_path / "b.jsonl", records(range(300, 420)) + records(range(10, 20), variant=1))
    c = write(tmp_path / "c.jsonl", records(range(420, 500)))
    write(a, records(range(280)) + records(range(600, 640)))  # for sync: 20 gone, 40 new
    subs = {"idx": str(idx), "b": str(b), "c": str(c)}
    procs = [start("index", *[arg.format(**subs) for arg in cmd], *(["--wait", "120"] if wait else []))
             for cmd in PAIRS[pair]]
    outs = [(p.wait(300), *p.communicate()) for p in procs]
    texts = assert_whole(idx)
    for (rc, _, err), cmd in zip(outs, PAIRS[pair], strict=True):
        assert "Traceback" not in err
        if rc != 0:  # the loser: one line naming the holder, nothing done
            assert not wait and rc == 1 and err.count("\n") == 1, err
            assert "is being changed by 'rag index" in err and "nothing was done" in err, err
            continue
        op = cmd[0]
        if op == "upsert":
            added = json.loads(Path(cmd[3].format(**subs)).read_text().splitlines()[0])
            assert texts[added["id"]] == added["text"]  # a writer that said it succeeded: its passages are there
        elif op == "delete":
            assert "p1" not in texts and "p2" not in texts
        elif op == "sync":
            assert "p600" in texts and "p290" not in texts
        else:
            assert any(h["op"] == "compact" for h in read_manifest(idx).history)
    if wait:  # the second waited for the first: both changes landed
        assert all(rc == 0 for rc, _, _ in outs)
    assert not (idx / ".work").exists() and len(list((idx / "versions").iterdir())) == 1


def test_a_held_lock_refuses_at_once_naming_the_holder(tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    build(write(tmp_path / "a.jsonl", records(range(50))), idx)
    before = tree(idx)
    with writing(idx, "upsert"):
        t0 = time.time()
        r = rag("index", "delete", str(idx), "--ids", "p1")
        waited = rag("index", "delete", str(idx), "--ids", "p1", "--wait", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert f"{idx} is being changed by 'upsert' (pid {os.getpid()}" in r.stderr
    assert "--wait SECONDS" in r.stderr and "waited" not in r.stderr
    assert waited.returncode == 1 and "nothing was done for 1 s" in waited.stderr
    assert time.time() - t0 < 60
    after = tree(idx)
    assert {k: v for k, v in after.items() if k != ".lock.owner"} == before  # nothing changed
    assert rag("index", "delete", str(idx), "--ids", "p1").returncode == 0  # free again


READER = r"""
import json, sys, time
import rag.index.vectors as vectors
from rag.embedding import passage_text
from rag.retriever import DenseRetriever

real = vectors.FaissIndex.load.__func__

def slow_load(cls, *a, **k):  # the store is open; the index file is read only after the change lands
    print("store-open", flush=True)
    time.sleep(float(sys.argv[2]))
    return real(cls, *a, **k)

vectors.FaissIndex.load = classmethod(slow_load)
r = DenseRetriever.from_folder(sys.argv[1])
rows = r.store.live_rows()
passages = r.store.get_rows(rows)
stored = r.index.vectors(rows)
fresh = r.embedder.encode_passages([passage_text(p.title, p.text) for p in passages])
bad = sum(1 for a, b in zip(stored, fresh) if abs(a - b).max() > 1e-5)
hits = [r.search(passage_text(p.title, p.text), 1)[0].passage.id == p.id for p in passages]
print(json.dumps({"version": r.version.number, "rows": len(rows), "mismatched": bad,
                  "self_hits": sum(hits)}), flush=True)
"""


@pytest.mark.parametrize("change", ["compact", "upsert"])
def test_a_reader_opening_while_a_change_lands_sees_one_version(tmp_path: Path, change: str) -> None:
    idx = tmp_path / "idx"
    build(write(tmp_path / "a.jsonl", records(range(220))), idx)
    assert rag("index", "delete", str(idx), *[f"--ids=p{i}" for i in range(0, 100, 3)]).returncode == 0
    old = read_manifest(idx).version
    reader = subprocess.Popen([sys.executable, "-c", READER, str(idx), "4"], stdout=subprocess.PIPE, text=True)
    assert reader.stdout is not None and reader.stdout.readline().strip() == "store-open"
    if change == "compact":  # renumbers every row: a mixed open would pair texts with other vectors
        r = rag("index", "compact", str(idx))
    else:
        r = rag("index", "upsert", str(idx), "--corpus",
                str(write(tmp_path / "b.jsonl", records(range(1, 100, 3), variant=1) + records(range(300, 340)))))
    assert r.returncode == 0, r.stderr
    assert read_manifest(idx).version == old + 1
    assert (idx / "versions" / f"v{old:06d}").is_dir()  # still held by the reader
    out = json.loads(reader.stdout.readline())
    reader.wait(60)
    assert out == {"version": old, "rows": 220 - 34, "mismatched": 0, "self_hits": 220 - 34}
    rag("index", "delete", str(idx), "--ids", "p2")  # the next change removes what no one holds
    assert [p.name for p in (idx / "versions").iterdir()] == [f"v{old + 2:06d}"]


def test_sync_and_delete_source_from_another_directory(tmp_path: Path) -> None:
    home, other = tmp_path / "home", tmp_path / "other"
    write(home / "data" / "base.jsonl", records(range(300)))
    write(other / "data" / "base.jsonl", records(range(10)))  # same name, another file
    idx = tmp_path / "idx"
    build(Path("data/base.jsonl"), idx, cwd=home)  # typed relative
    assert read_manifest(idx).corpora[0]["path"] == str(home / "data" / "base.jsonl")
    r = rag("index", "sync", str(idx), cwd=other)
    assert r.returncode == 0 and json.loads(r.stdout)["changes"] == [] and read_manifest(idx).passages == 300
    r = rag("index", "delete", str(idx), "--source", "data/base.jsonl", cwd=other)  # names other/data/...
    assert r.returncode == 0 and json.loads(r.stdout)["deleted"] == 0
    spelled = str(home / "data" / ".." / "data" / "base.jsonl")
    dry = rag("index", "delete", str(idx), "--source", spelled, "--dry-run", cwd=other)
    assert json.loads(dry.stdout)["deleted"] == 300 and read_manifest(idx).passages == 300
    refused = rag("index", "delete", str(idx), "--source", spelled, cwd=other)
    assert refused.returncode == 1 and "deletes 300 of its 300 passages (more than half)" in refused.stderr
    assert "--yes" in refused.stderr and read_manifest(idx).passages == 300
    # the indexed file replaced by another one that shares 10 ids: looks like another file
    write(home / "data" / "base.jsonl", records(range(10)) + records(range(900, 920)))
    plan = json.loads(rag("index", "sync", str(idx), "--dry-run", cwd=other).stdout)["changes"][0]
    assert (plan["added"], plan["unchanged"], plan["removed"]) == (20, 10, 290)
    refused = rag("index", "sync", str(idx), cwd=other)
    assert refused.returncode == 1 and "no longer holds 290 of the 300 passages" in refused.stderr
    assert read_manifest(idx).passages == 300
    ok = rag("index", "sync", str(idx), "--yes", cwd=other)
    assert ok.returncode == 0 and read_manifest(idx).passages == 30
    moved = home / "data" / "base.jsonl"
    moved.rename(home / "moved.jsonl")
    gone = rag("index", "sync", str(idx), cwd=other)
    assert gone.returncode == 1 and f"corpus {moved} named in the manifest does not exist" in gone.stderr
    assert f"--source {moved}" in gone.stderr


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip(p: Path) -> None:
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    p.write_bytes(bytes(raw))


DAMAGE = {"truncated": _truncate, "missing": lambda p: p.resolve().unlink(), "bit-flipped": _flip,
          "link removed": lambda p: p.unlink()}


@pytest.mark.parametrize("name", ["index.faiss", "passages.db"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_no_change_on_a_damaged_folder(tmp_path: Path, name: str, damage: str) -> None:
    idx = tmp_path / "idx"
    build(write(tmp_path / "a.jsonl", records(range(60))), idx)
    more = write(tmp_path / "b.jsonl", records(range(60, 70)))
    DAMAGE[damage](idx / name)
    before = tree(idx)
    for cmd in (["delete", str(idx), "--ids", "p1"], ["upsert", str(idx), "--corpus", str(more)],
                ["sync", str(idx)], ["compact", str(idx)]):
        r = rag("index", *cmd)
        if cmd[0] in ("sync", "compact") and r.returncode == 0:
            continue  # nothing to do, nothing done (sync: corpus unchanged; compact: nothing deleted)
        assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert name in r.stderr and "nothing was changed" in r.stderr, r.stderr
    assert tree(idx) == before
    v = rag("index", "verify", str(idx))
    assert v.returncode == 1 and name in v.stdout


def test_a_hand_edit_of_the_manifest_fails_verify(tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    build(write(tmp_path / "a.jsonl", records(range(30))), idx)
    m = json.loads((idx / "manifest.json").read_text())
    (idx / "manifest.json").write_text(json.dumps({**m, "metric": "l2"}))
    v = rag("index", "verify", str(idx))
    assert v.returncode == 1 and "edited after it was written" in v.stdout


def test_a_running_server_follows_changes(tmp_path: Path) -> None:
    passages = records(range(40)) + [{"id": "secret", "title": "Zorblax", "text": "Zorblax Kelmora violin prize"}]
    idx = tmp_path / "idx"
    build(write(tmp_path / "a.jsonl", passages), idx)
    pipe = tmp_path / "p.yaml"
    pipe.write_text("name: follow\nkind: retrieval\nretrieval:\n  mode: dense\n  top_k: 5\n")
    import httpx

    with server_process(lambda port: [RAG, "serve", "-p", str(pipe), "--index", str(idx), "--port", str(port)],
                        tmp_path / "serve.log", start_timeout_s=120) as (base, _):
        def ids(mode: str, query: str = "Zorblax Kelmora violin prize") -> list[str]:
            r = httpx.post(base + "/v1/retrieve", json={"query": query, "top_k": 5, "mode": mode}, timeout=60)
            assert r.status_code == 200, r.text
            return [h["id"] for h in r.json()["data"]]

        def cited() -> list[str]:
            r = httpx.post(base + "/v1/chat/completions", timeout=60, json={
                "model": "follow", "messages": [{"role": "user", "content": "Zorblax Kelmora violin prize"}]})
            assert r.status_code == 200, r.text
            return [c["id"] for c in r.json()["rag"]["citations"]]

        modes = ["dense", "bm25", "hybrid"]
        assert all(ids(m)[0] == "secret" for m in modes) and cited()[0] == "secret"
        v1 = httpx.get(base + "/health").json()
        with ThreadPoolExecutor(8) as pool:  # requests in flight while the change lands
            flying = [pool.submit(ids, modes[i % 3], f"w{i} w{i + 1} item{i}") for i in range(60)]
            r = rag("index", "delete", str(idx), "--ids", "secret")
            assert r.returncode == 0, r.stderr
            assert all(f.result() for f in flying)  # each answered (BM25 may find fewer than 5)
        assert all("secret" not in ids(m) for m in modes) and "secret" not in cited()
        v2 = httpx.get(base + "/health").json()
        assert (v2["version"], v2["passages"]) == (v1["version"] + 1, v1["passages"] - 1)
        assert httpx.get(base + "/v1/info").json()["index"]["version"] == v2["version"]
        new = write(tmp_path / "b.jsonl", [{"id": "fresh", "title": "Quarnix", "text": "Quarnix lighthouse keeper"}])
        assert rag("index", "upsert", str(idx), "--corpus", str(new)).returncode == 0
        assert all(ids(m, "Quarnix lighthouse keeper")[0] == "fresh" for m in modes)
    versions = list((idx / "versions").iterdir())
    assert len(versions) == 1  # the server let go of the old versions, which were then removed


def test_a_query_that_is_not_utf8_is_a_one_line_error(tmp_path: Path) -> None:
    idx = tmp_path / "idx"
    build(write(tmp_path / "a.jsonl", records(range(20))), idx)
    r = subprocess.run([RAG, "search", str(idx), b"caf\xe9 w1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "the query is not valid UTF-8 (byte 0xe9 at character 3)" in r.stderr
