"""`rag eval` as a subprocess on a small slice: outputs, resume, --check exit code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rag.config import IndexRecipe
from rag.index import build_index
from tests.conftest import run_cli

pytestmark = pytest.mark.integration


def test_rag_eval_cli_on_a_squad_slice(shared_data: Path, tmp_path: Path) -> None:
    squad = shared_data / "squad-v1.1-dev/dev-v1.1.json"
    data = json.loads(squad.read_text())
    data["data"] = data["data"][:2]  # two articles: a small closed world
    small = tmp_path / "squad-small.json"
    small.write_text(json.dumps(data))
    build_index(IndexRecipe(name="s", corpus=str(small), out=str(tmp_path / "idx"), embedder="hash:256"),
                progress=False)
    pipeline = tmp_path / "bm25.yaml"
    pipeline.write_text("name: bm25\nkind: retrieval\nretrieval: {mode: bm25, top_k: 20}\n"
                        "expected:\n  tolerance: 0.001\n  metrics: {recall@20: 0.0}\n")
    out = tmp_path / "out"
    args = ["eval", "-p", str(pipeline), "--data", str(small), "--index", str(tmp_path / "idx"),
            "--limit", "40", "--out", str(out), "-q"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    (p,) = summary["pipelines"]
    assert p["n"] == 40 and summary["questions"] == 40
    assert p["metrics"]["recall@20"]["mean"] > 0.8  # BM25 finds SQuAD paragraphs easily
    lo, hi = p["metrics"]["recall@1"]["ci95"]
    assert lo <= p["metrics"]["recall@1"]["mean"] <= hi
    assert len((out / "bm25/predictions.jsonl").read_text().splitlines()) == 40
    assert (out / "report.md").exists() and (out / "recall_at_k.png").exists()
    # resume with a larger limit only does the new questions
    r = run_cli(*[a if a != "40" else "50" for a in args], "--resume")
    assert r.returncode == 0, r.stderr
    assert len((out / "bm25/predictions.jsonl").read_text().splitlines()) == 50
    # --check fails on drift from the expected: block, with a one-line error
    r = run_cli(*args, "--check")
    assert r.returncode == 1 and "recall@20" in r.stderr and "expected 0.0000" in r.stderr
