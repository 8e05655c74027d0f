"""``rag index build --ray`` against a real Ray cluster on 127.0.0.1 (a head and a worker node
process, one CPU each), compared with a local build of the same corpus."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli

pytest.importorskip("ray.data", reason="needs the ray extra")
pytestmark = pytest.mark.integration

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    """A head + one worker node; yields the environment a client needs (address, token)."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats",
              "--object-store-memory=150000000"]
    logs = Path(temp)
    procs = [subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false",
                               f"--temp-dir={temp}", *common], env=env,
                              stdout=open(logs / "head.log", "w"), stderr=subprocess.STDOUT)]
    try:
        _wait_port(port, procs[0], logs / "head.log")
        procs.append(subprocess.Popen([RAY, "start", f"--address=127.0.0.1:{port}", *common], env=env,
                                      stdout=open(logs / "worker.log", "w"), stderr=subprocess.STDOUT))
        address = f"127.0.0.1:{port}"
        _wait_nodes(address, 2, env)
        yield {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": env["RAY_AUTH_TOKEN"], "ADDRESS": address}
    finally:
        for p in reversed(procs):  # `ray start --block` stops its node's processes on SIGTERM
            p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(temp, ignore_errors=True)


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray head exited: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    pytest.fail("ray head did not open its port in 60 s")


def _wait_nodes(address: str, n: int, env: dict[str, str]) -> None:
    code = (f"import ray; ray.init(address={address!r}, logging_level='ERROR'); "
            "print(sum(1 for x in ray.nodes() if x['Alive']))")
    for _ in range(30):
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        if r.returncode == 0 and r.stdout.strip().endswith(str(n)):
            return
        time.sleep(1)
    pytest.fail(f"cluster never had {n} nodes: {r.stderr[-2000:]}")


def _corpus(shared_data: Path, tmp: Path, n: int) -> Path:
    src = shared_data / "dpr-wiki-sample" / "psgs_w100.flashrag_sample1000.tsv"
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    out = tmp / "psgs.tsv"
    out.write_text("".join(lines[: n + 1]), encoding="utf-8")  # header + n passages
    return out


def _build(corpus: Path, out: Path, *extra: str, env: dict[str, str] | None = None,
           embedder: str = "all-MiniLM-L6-v2") -> subprocess.CompletedProcess[str]:
    return run_cli("index", "build", "--corpus", str(corpus), "--out", str(out), "--embedder", embedder,
                   "--batch-size", "8", "-q", *extra, env=env)


@pytest.fixture(scope="module")
def local96(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """96 DPR passages and their local (non-Ray) build, the reference both Ray builds must equal."""
    tmp = tmp_path_factory.mktemp("local96")
    corpus = _corpus(shared_data, tmp, 96)
    assert _build(corpus, tmp / "local").returncode == 0
    return corpus, tmp / "local"


def _contents(folder: Path) -> tuple[list[tuple[object, ...]], np.ndarray, dict[str, object]]:
    import faiss

    with sqlite3.connect(folder / "passages.db") as db:
        rows = db.execute("SELECT * FROM passages ORDER BY rowid").fetchall()
    index = faiss.read_index(str(folder / "index.faiss"))
    manifest = json.loads((folder / "manifest.json").read_text())
    # name: from the folder; files: checksums of bytes that differ within atol; change_key names the
    # mode (local or ray) and digest covers the rest, build time included
    for volatile in ("built_at", "build_seconds", "name", "files", "change_key", "digest"):
        manifest.pop(volatile)
    return rows, index.reconstruct_n(0, index.ntotal), manifest


def _assert_same_index(a: Path, b: Path, atol: float) -> None:
    rows_a, vecs_a, man_a = _contents(a)
    rows_b, vecs_b, man_b = _contents(b)
    assert rows_a == rows_b  # ids, texts, titles, locations, in the same order
    assert vecs_a.shape == vecs_b.shape
    np.testing.assert_allclose(vecs_a, vecs_b, atol=atol)
    assert man_a == man_b


def test_ray_build_on_two_nodes_equals_local_build(cluster: dict[str, str], local96: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    corpus, local = local96
    dist = tmp_path / "ray"
    r = run_cli("--debug", "index", "build", "--corpus", str(corpus), "--out", str(dist), "--batch-size", "8",
                "-q", "--ray", "--ray-address", cluster["ADDRESS"], "--ray-window", "16", env=cluster)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["passages"] == 96
    assert "ray build: 6 windows on 2 nodes" in r.stderr  # both node processes encoded
    _assert_same_index(local, dist, atol=1e-5)  # batch composition differs: float noise only
    assert not (dist / ".work").exists()


def test_killed_ray_build_resumes_with_only_the_missing_windows(cluster: dict[str, str], local96: tuple[Path, Path],
                                                                tmp_path: Path) -> None:
    corpus, local = local96
    out = tmp_path / "ray"
    args = ["index", "build", "--corpus", str(corpus), "--out", str(out), "--batch-size", "8", "-q",
            "--ray", "--ray-address", cluster["ADDRESS"], "--ray-window", "8"]
    proc = subprocess.Popen([str(Path(sys.executable).with_name("rag")), *args], env={**os.environ, **cluster},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not any(out.glob(".work/*/emb/0*.npy")):
        assert proc.poll() is None, "the build ended before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "current").exists()  # nothing published
    r = run_cli("--debug", *args, env=cluster)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = [line for line in r.stderr.splitlines() if "resuming ray build" in line]
    assert resumed, r.stderr[-3000:]
    done, total = (int(x) for x in resumed[0].split(": ")[-1].split(" windows")[0].split(" of "))
    assert total == 12 and 1 <= done < total
    _assert_same_index(local, out, atol=1e-5)


def test_ray_build_reports_bad_lines_like_a_local_build(cluster: dict[str, str], tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    good = [json.dumps({"id": f"p{i}", "text": f"passage number {i} about topic {i % 3}"}) for i in range(20)]
    corpus.write_text("\n".join(good[:5] + ["{not json"] + good[5:]) + "\n")
    ray = ["--ray", "--ray-address", cluster["ADDRESS"], "--ray-window", "4"]
    failed = _build(corpus, tmp_path / "a", *ray, env=cluster, embedder="hash:32")
    assert failed.returncode == 1
    assert f"{corpus}:6" in failed.stderr and "--skip-bad-lines" in failed.stderr
    assert failed.stderr == _build(corpus, tmp_path / "b", embedder="hash:32").stderr  # as a local build
    assert not (tmp_path / "a" / "current").exists() and not (tmp_path / "a" / ".work").exists()

    assert _build(corpus, tmp_path / "l", "--skip-bad-lines", embedder="hash:32").returncode == 0
    r = _build(corpus, tmp_path / "r", "--skip-bad-lines", *ray, env=cluster, embedder="hash:32")
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_index(tmp_path / "l", tmp_path / "r", atol=0)
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report == json.loads((tmp_path / "l" / "report.json").read_text())
    assert report["corpora"][0]["bad_lines"] == 1


def test_ray_without_address_starts_a_local_cluster(tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"p{i}", "text": f"words {i} and {i * 7}"}) + "\n"
                              for i in range(40)))
    assert _build(corpus, tmp_path / "l", embedder="hash:32").returncode == 0
    r = _build(corpus, tmp_path / "r", "--ray", env={"RAY_ADDRESS": ""}, embedder="hash:32")
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_index(tmp_path / "l", tmp_path / "r", atol=0)


WORKER_ERROR_SCRIPT = """
import json, sys
from pathlib import Path
from rag.corpus import iter_records
from rag.index.ray import RayOptions, encode_with_ray
from rag.errors import ConfigError
from rag.store import PassageStore

corpus, partial, address = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
partial.mkdir()
window = partial / "todo" / f"{0:012d}.jsonl"

def records():
    yield from iter_records(str(corpus), "jsonl")
    window.unlink()  # the read phase wrote it; make it unreadable for the worker
    window.mkdir()

with PassageStore(partial / "passages.db") as store:
    try:
        encode_with_ray(partial, store, records(), {"name": "hash:16"}, 4, "k", RayOptions(address=address),
                        progress=False)
    except ConfigError as e:
        print(json.dumps(str(e)))
"""


def test_a_worker_error_surfaces_as_one_clear_message(cluster: dict[str, str], tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"p{i}", "text": f"text {i}"}) + "\n" for i in range(8)))
    r = subprocess.run([sys.executable, "-c", WORKER_ERROR_SCRIPT, str(corpus), str(tmp_path / "idx.partial"),
                        cluster["ADDRESS"]], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **cluster})
    assert r.returncode == 0, r.stderr[-3000:]
    message = json.loads(r.stdout.strip().splitlines()[-1])
    assert message.startswith("ray build failed on node ") and "(window at row 0): IsADirectoryError" in message
    assert "\n" not in message
