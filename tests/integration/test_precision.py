"""Reduced-precision encoding with the packaged MiniLM: bf16 (torch) and int8 (ONNX Runtime)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rag.embedding import SentenceTransformerEmbedder, cpu_supports_bf16, resolve_precision
from rag.errors import ModelNotFoundError
from rag.retriever import DenseRetriever
from tests.conftest import run_cli

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def abstracts(shared_data: Path) -> list[str]:
    with open(shared_data / "beir-scifact" / "corpus.jsonl", encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(48)]
    return [f"{r['title']}\n{r['text']}" for r in rows]


@pytest.fixture(scope="module")
def fp32_vectors(abstracts: list[str]) -> np.ndarray:
    return SentenceTransformerEmbedder(device="cpu", precision="fp32").encode_passages(abstracts)


def test_resolve_precision() -> None:
    assert resolve_precision("auto", "cuda:0") == "fp16"
    assert resolve_precision("auto", "cpu") == ("bf16" if cpu_supports_bf16() else "fp32")
    assert resolve_precision("int8", "cpu") == "int8"
    with pytest.raises(ModelNotFoundError, match="use fp16 on CUDA"):
        resolve_precision("int8", "cuda")
    with pytest.raises(ModelNotFoundError, match="one of auto, fp32, bf16, fp16, int8"):
        resolve_precision("fp8", "cpu")


@pytest.mark.parametrize(("precision", "min_cosine"), [("bf16", 0.995), ("int8", 0.98)])
def test_reduced_precision_vectors_stay_close_to_fp32(precision: str, min_cosine: float, abstracts: list[str],
                                                      fp32_vectors: np.ndarray) -> None:
    if precision == "bf16" and not cpu_supports_bf16():
        pytest.skip("this CPU has no native bf16")
    emb = SentenceTransformerEmbedder(device="cpu", precision=precision)
    vecs = emb.encode_passages(abstracts)
    assert emb.precision == precision and vecs.dtype == np.float32 and vecs.shape == fp32_vectors.shape
    cos = (vecs * fp32_vectors).sum(1)
    assert cos.min() >= min_cosine
    assert not np.array_equal(vecs, fp32_vectors)  # really computed at another precision
    # each abstract's fp32 nearest neighbour stays among its 3 nearest (near-ties may swap)
    nearest32 = np.argsort(-(fp32_vectors @ fp32_vectors.T), axis=1)[:, 1]
    top3 = np.argsort(-(vecs @ vecs.T), axis=1)[:, 1:4]
    assert np.mean([n in row for n, row in zip(nearest32, top3)]) >= 0.95


def test_int8_export_is_cached_and_reused(tmp_path: Path, abstracts: list[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAG_CACHE_DIR", str(tmp_path))
    a = SentenceTransformerEmbedder(device="cpu", precision="int8").encode_queries(abstracts[:4])
    files = list((tmp_path / "models" / "int8").glob("*/model.int8.onnx"))
    assert len(files) == 1 and not list((tmp_path / "models" / "int8").glob("*.tmp*"))
    mtime = files[0].stat().st_mtime_ns
    b = SentenceTransformerEmbedder(device="cpu", precision="int8").encode_queries(abstracts[:4])
    assert files[0].stat().st_mtime_ns == mtime  # exported once
    np.testing.assert_array_equal(a, b)


def test_int8_index_records_precision_and_queries_match(tmp_path: Path, abstracts: list[str]) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(abstracts)))
    for p in ("fp32", "int8"):
        r = run_cli("index", "build", "--corpus", str(corpus), "--out", str(tmp_path / p), "--precision", p, "-q")
        assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "int8" / "manifest.json").read_text())["embedder"]["precision"] == "int8"
    queries = [t.split("\n")[0] for t in abstracts[:12]]  # each abstract's title finds it
    top1 = {}
    for p in ("fp32", "int8"):
        retriever = DenseRetriever.from_folder(tmp_path / p)
        assert retriever.embedder.precision == p  # queries encoded like the passages
        top1[p] = [hits[0].passage.id for hits in retriever.search_batch(queries, 1)]
    assert top1["int8"] == top1["fp32"] == [f"d{i}" for i in range(12)]
    r = run_cli("search", str(tmp_path / "int8"), queries[0], "--precision", "fp32", "--json")
    assert r.returncode == 0 and "built at int8 precision; queries are encoded at fp32" in r.stderr
