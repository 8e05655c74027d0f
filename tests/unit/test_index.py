from __future__ import annotations

import json
import logging
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from rag.config import IndexRecipe
from rag.embedding import HashingEmbedder
from rag.errors import ConfigError, CorpusError, IndexMismatchError, IndexNotFoundError
from rag.index import FaissIndex, add_to_index, build_index, read_manifest
from rag.retriever import DenseRetriever
from rag.store import PassageStore

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa",
         "lambda", "mu", "nu", "xi", "omicron", "pi", "rho", "sigma", "tau", "upsilon"]


def make_corpus(path: Path, n: int, start: int = 0) -> Path:
    rng = np.random.default_rng(start)
    with path.open("w") as f:
        for i in range(start, start + n):
            words = " ".join(rng.choice(WORDS, size=8))
            f.write(json.dumps({"id": f"p{i}", "title": f"doc {i}", "text": f"{words} item{i}",
                                "group": "even" if i % 2 == 0 else "odd"}) + "\n")
    return path


def recipe(tmp_path: Path, corpus: Path, **kw: Any) -> IndexRecipe:
    return IndexRecipe(**{"name": "t", "corpus": str(corpus), "out": str(tmp_path / "idx"),
                          "embedder": "hash:32", "batch_size": 16, **kw})


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_flat_search_matches_brute_force_numpy(metric: str) -> None:
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((500, 24)).astype(np.float32)
    xq = rng.standard_normal((7, 24)).astype(np.float32)
    idx = FaissIndex.create(24, "Flat", metric, device="cpu")
    idx.add(xb)
    scores, ids = idx.search(xq, 10)
    if metric == "ip":
        ref = xq @ xb.T
        order = np.argsort(-ref, axis=1)[:, :10]
    else:
        ref = ((xq[:, None, :] - xb[None, :, :]) ** 2).sum(-1)
        order = np.argsort(ref, axis=1)[:, :10]
    assert np.array_equal(ids, order)
    np.testing.assert_allclose(scores, np.take_along_axis(ref, order, 1), rtol=1e-4, atol=1e-4)


def test_ivf_with_all_lists_probed_equals_flat_and_rows_filter_restricts() -> None:
    rng = np.random.default_rng(1)
    xb = rng.standard_normal((2000, 16)).astype(np.float32)
    xq = rng.standard_normal((5, 16)).astype(np.float32)
    flat = FaissIndex.create(16, "Flat", "ip", device="cpu")
    flat.add(xb)
    ivf = FaissIndex.create(16, "IVF16,Flat", "ip", device="cpu")
    assert not ivf.is_trained
    ivf.train(xb)
    ivf.add(xb)
    _, exact = flat.search(xq, 5)
    _, narrow = ivf.search(xq, 5, nprobe=1)
    _, full = ivf.search(xq, 5, nprobe=16)
    assert np.array_equal(full, exact)
    assert not np.array_equal(narrow, exact)  # nprobe is honoured per call
    allowed = list(range(0, 2000, 3))
    _, filtered = flat.search(xq, 5, rows=allowed)
    assert set(filtered.ravel()) <= set(allowed)
    ref = np.argsort(-(xq @ xb[allowed].T), axis=1)[:, :5]
    assert np.array_equal(filtered, np.asarray(allowed)[ref])


def test_hnsw_ef_search_per_call() -> None:
    rng = np.random.default_rng(2)
    xb = rng.standard_normal((3000, 16)).astype(np.float32)
    idx = FaissIndex.create(16, "HNSW8", "l2", device="cpu")
    idx.add(xb)
    flat = FaissIndex.create(16, "Flat", "l2", device="cpu")
    flat.add(xb)
    xq = rng.standard_normal((50, 16)).astype(np.float32)
    _, exact = flat.search(xq, 10)
    _, wide = idx.search(xq, 10, ef_search=512)
    _, tight = idx.search(xq, 10, ef_search=10)
    recall = lambda got: np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact)])  # noqa: E731
    assert recall(wide) >= 0.98
    assert recall(tight) < recall(wide)


def test_bad_factory_string_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="invalid FAISS factory string 'Flatt'"):
        FaissIndex.create(8, "Flatt")


def test_build_then_search_exact_ids_filter_and_manifest(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path / "c.jsonl", 100)
    m = build_index(recipe(tmp_path, corpus), progress=False)
    assert m.passages == 100 and m.embedder["name"] == "hash:32" and m.embedder["dim"] == 32
    assert m.corpora[0]["fingerprint"].startswith("sha256:")
    assert not (tmp_path / "idx" / ".work").exists()  # the work folder became the version
    r = DenseRetriever.from_folder(tmp_path / "idx")
    # a passage's own text finds itself first
    target = next(p for p in PassageStore(tmp_path / "idx" / "passages.db", readonly=True).iter_passages()
                  if p.id == "p42")
    hits = r.search(f"{target.title}\n{target.text}", 3)
    assert hits[0].passage.id == "p42" and hits[0].rank == 1
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    odd = r.search(target.text, 10, filter={"group": "odd"})
    assert odd and all(h.passage.meta["group"] == "odd" for h in odd)
    assert r.search(target.text, 10, filter={"group": "none"}) == []


def test_unchanged_rebuild_is_skipped_and_force_rebuilds(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path / "c.jsonl", 40)
    first = build_index(recipe(tmp_path, corpus), progress=False)
    again = build_index(recipe(tmp_path, corpus), progress=False)
    assert again.built_at == first.built_at
    make_corpus(corpus, 41)
    changed = build_index(recipe(tmp_path, corpus), progress=False)
    assert changed.passages == 41


def test_index_refuses_a_different_embedder(tmp_path: Path) -> None:
    build_index(recipe(tmp_path, make_corpus(tmp_path / "c.jsonl", 20)), progress=False)
    with pytest.raises(IndexMismatchError, match=r"name: index has 'hash:32', got 'hash:16'.*rebuild"):
        DenseRetriever.from_folder(tmp_path / "idx", embedder=HashingEmbedder(16))


def test_failed_build_leaves_the_published_index_untouched(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path / "c.jsonl", 30)
    build_index(recipe(tmp_path, corpus), progress=False)
    before = (tmp_path / "idx" / "index.faiss").read_bytes()
    with corpus.open("a") as f:
        f.write('{"id": "p3", "text": "duplicate"}\n')
    with pytest.raises(CorpusError, match=r"c\.jsonl:31: duplicate passage id 'p3'"):
        build_index(recipe(tmp_path, corpus), progress=False)
    assert (tmp_path / "idx" / "index.faiss").read_bytes() == before
    assert read_manifest(tmp_path / "idx").passages == 30


CRASHING_BUILD = """
import os, sys
from rag.config import IndexRecipe
from rag.embedding import HashingEmbedder
from rag.index import build_index

class Crashing(HashingEmbedder):
    calls = 0
    def encode_passages(self, texts):
        Crashing.calls += 1
        if Crashing.calls == 3:
            os._exit(9)  # like kill -9: no cleanup, no finally blocks
        return super().encode_passages(texts)

build_index(IndexRecipe(name="t", corpus=sys.argv[1], out=sys.argv[2], embedder="hash:32",
                        batch_size=16), embedder=Crashing(32), progress=False)
"""


def test_killed_build_resumes_and_equals_an_uninterrupted_build(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path / "c.jsonl", 100)
    out = tmp_path / "idx"
    proc = subprocess.run([sys.executable, "-c", CRASHING_BUILD, str(corpus), str(out)])
    assert proc.returncode == 9
    assert (out / ".work").is_dir() and not (out / "current").exists()  # nothing published yet
    with pytest.raises(IndexNotFoundError, match="interrupted: run the same build again"):
        read_manifest(out)

    class Counting(HashingEmbedder):
        calls = 0

        def encode_passages(self, texts: Any) -> np.ndarray:
            Counting.calls += 1
            return super().encode_passages(texts)

    build_index(recipe(tmp_path, corpus), embedder=Counting(32), progress=False)
    assert Counting.calls == 7 - 2  # 100 passages / 16 per batch = 7 batches; 2 were committed
    build_index(recipe(tmp_path, corpus, out=str(tmp_path / "ref")), progress=False)
    a, b = (faiss.read_index(str(tmp_path / d / "index.faiss")) for d in ("idx", "ref"))
    assert a.ntotal == b.ntotal == 100
    np.testing.assert_array_equal(a.reconstruct_n(0, 100), b.reconstruct_n(0, 100))
    ids = [[p.id for p in PassageStore(tmp_path / d / "passages.db", readonly=True).iter_passages()]
           for d in ("idx", "ref")]
    assert ids[0] == ids[1] == [f"p{i}" for i in range(100)]


def test_ivf_pq_build_trains_on_a_sample(tmp_path: Path) -> None:
    corpus = make_corpus(tmp_path / "c.jsonl", 600)
    m = build_index(recipe(tmp_path, corpus, factory="IVF4,PQ4"), progress=False)
    assert m.passages == 600
    r = DenseRetriever.from_folder(tmp_path / "idx", nprobe=4)
    assert len(r.search("alpha beta", 5)) == 5


def test_add_appends_without_rebuilding(tmp_path: Path) -> None:
    build_index(recipe(tmp_path, make_corpus(tmp_path / "a.jsonl", 40)), progress=False)
    m = add_to_index(tmp_path / "idx", str(make_corpus(tmp_path / "b.jsonl", 10, start=40)),
                     progress=False)
    assert m.passages == 50 and len(m.corpora) == 2
    r = DenseRetriever.from_folder(tmp_path / "idx")
    assert r.index.ntotal == 50
    p = PassageStore(tmp_path / "idx" / "passages.db", readonly=True).get("p45")
    assert p is not None
    assert r.search(f"{p.title}\n{p.text}", 1)[0].passage.id == "p45"
    with pytest.raises(CorpusError, match="duplicate passage id 'p40'"):
        add_to_index(tmp_path / "idx", str(tmp_path / "b.jsonl"), progress=False)
    assert read_manifest(tmp_path / "idx").passages == 50


# --- GPU placement logic, with a fake faiss GPU layer over the real CPU faiss -------------


class FakeGpuIndex:
    def __init__(self, cpu: Any, log: list[str], oom: bool = False):
        self.cpu, self.log, self.oom = faiss.clone_index(cpu), log, oom

    def search(self, q: np.ndarray, k: int) -> Any:
        self.log.append(f"gpu.search k={k}")
        if self.oom:
            raise RuntimeError("Error in GpuResources: cudaMalloc error out of memory")
        return self.cpu.search(q, k)

    def add(self, x: np.ndarray) -> None:
        self.log.append("gpu.add")
        self.cpu.add(x)

    def train(self, x: np.ndarray) -> None:
        self.cpu.train(x)


def fake_faiss(ngpu: int, log: list[str], oom: bool = False) -> Any:
    fake = types.SimpleNamespace(**{k: getattr(faiss, k) for k in dir(faiss) if not k.startswith("__")})
    fake.get_num_gpus = lambda: ngpu
    fake.StandardGpuResources = lambda: "res"

    def to_gpu(res: Any, dev: int, index: Any) -> FakeGpuIndex:
        log.append(f"cpu_to_gpu dev={dev}")
        return FakeGpuIndex(index, log, oom)

    def to_all(index: Any, co: Any, ngpu: int) -> FakeGpuIndex:
        log.append(f"cpu_to_all_gpus ngpu={ngpu} shard={co.shard}")
        return FakeGpuIndex(index, log, oom)

    def to_cpu(gpu: FakeGpuIndex) -> Any:
        log.append("gpu_to_cpu")
        return faiss.clone_index(gpu.cpu)

    fake.index_cpu_to_gpu, fake.index_cpu_to_all_gpus, fake.index_gpu_to_cpu = to_gpu, to_all, to_cpu
    fake.GpuMultipleClonerOptions = lambda: types.SimpleNamespace(shard=False)
    return fake


def _flat(n: int = 300) -> tuple[Any, np.ndarray]:
    xb = np.random.default_rng(3).standard_normal((n, 8)).astype(np.float32)
    index = faiss.IndexFlatIP(8)
    index.add(xb)
    return index, xb


def test_gpu_is_used_when_present_and_falls_back_to_cpu(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture,
                                                         tmp_path: Path) -> None:
    log: list[str] = []
    monkeypatch.setattr("rag.index.vectors.import_faiss", lambda: fake_faiss(1, log))
    cpu, xb = _flat()
    idx = FaissIndex(cpu, device="auto")
    assert idx.on_gpu and log == ["cpu_to_gpu dev=0"]
    _, ids = idx.search(xb[:2], 5)
    assert log[-1] == "gpu.search k=5" and list(ids[:, 0]) == [0, 1]
    log.clear()
    with caplog.at_level(logging.WARNING):
        _, ids = idx.search(xb[:2], 3000)
    assert log == [] and "k > 2048" in caplog.text and ids.shape == (2, 3000)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, ids = idx.search(xb[:2], 5, rows=[1, 2, 3])
    assert log == [] and "filters are not supported on GPU" in caplog.text
    assert set(ids.ravel()) == {1, 2, 3, -1}  # -1 pads the two empty slots
    # deleted rows: the GPU fetches k + their count and drops them, equal to the CPU's exclusion
    log.clear()
    deleted = [0, 1, 5, 17]
    scores, ids = idx.search(xb[:3], 6, exclude=deleted)
    ref_scores, ref_ids = FaissIndex(cpu, device="cpu").search(xb[:3], 6, exclude=deleted)
    assert log == ["gpu.search k=10"] and np.array_equal(ids, ref_ids) and not set(ids.ravel()) & set(deleted)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5)
    idx.add(xb[:10])
    idx.save(tmp_path / "i.faiss")
    assert log[-2:] == ["gpu.add", "gpu_to_cpu"]
    assert faiss.read_index(str(tmp_path / "i.faiss")).ntotal == 310


def test_gpu_oom_falls_back_to_cpu(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    log: list[str] = []
    monkeypatch.setattr("rag.index.vectors.import_faiss", lambda: fake_faiss(1, log, oom=True))
    cpu, xb = _flat()
    idx = FaissIndex(cpu)
    with caplog.at_level(logging.WARNING):
        _, ids = idx.search(xb[:2], 5)
    assert "out of memory" in caplog.text and list(ids[:, 0]) == [0, 1]


def test_multi_gpu_shards_and_cpu_device_stays_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    log: list[str] = []
    monkeypatch.setattr("rag.index.vectors.import_faiss", lambda: fake_faiss(4, log))
    assert FaissIndex(_flat()[0]).on_gpu and log == ["cpu_to_all_gpus ngpu=4 shard=True"]
    log.clear()
    assert not FaissIndex(_flat()[0], device="cpu").on_gpu and log == []


def test_gpu_requested_without_gpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rag.index.vectors.import_faiss", lambda: fake_faiss(0, []))
    with pytest.raises(ConfigError, match="faiss sees no GPU; install the 'gpu' extra"):
        FaissIndex(_flat()[0], device="gpu")
    assert not FaissIndex(_flat()[0], device="auto").on_gpu


def test_a_failed_first_build_leaves_nothing_and_an_empty_corpus_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "one"}\n{not json\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: invalid JSON"):
        build_index(recipe(tmp_path, bad), progress=False)
    assert not (tmp_path / "idx").exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"id": "a", "text": "   "}\n')
    with pytest.raises(CorpusError, match=r"empty\.jsonl: no passages to index \(1 empty texts"):
        build_index(recipe(tmp_path, empty), progress=False)
    assert not (tmp_path / "idx").exists()
