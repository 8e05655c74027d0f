"""Retrieval measures with graded judgments, TREC files, significance tests between pipelines
and fusion tuning, against hand-computed values and constructed cases with known answers."""

from __future__ import annotations

import doctest
import json
import math
import random
from pathlib import Path

import pytest

import rag.eval.metrics
import rag.eval.retrieval
from rag.eval.compare import compare, paired_p_value
from rag.eval.datasets import EvalItem, load_dataset
from rag.eval.fusion import split, tune
from rag.eval.retrieval import per_query, read_qrels, read_run, write_run
from rag.eval.runner import compare_runs, evaluate
from rag.retriever import fuse
from rag.types import Hit, Passage
from tests.unit.test_eval import _data, _pipeline_file, scripted_pipeline

L2 = math.log2


def test_docstring_examples() -> None:
    for module in (rag.eval.metrics, rag.eval.retrieval):
        assert doctest.testmod(module).failed == 0


def test_graded_measures_hand_computed() -> None:
    qrels = {"q": {"d1": 2, "d2": 1, "d3": 0}}  # d3 judged non-relevant
    run = {"q": [("d2", 0.9), ("d1", 0.8), ("d5", 0.7), ("d3", 0.6)]}
    m = per_query(qrels, run)["q"]
    graded = (1 / L2(2) + 2 / L2(3)) / (2 / L2(2) + 1 / L2(3))
    assert m["ndcg@10"] == pytest.approx(graded)
    binary = per_query({"q": {"d1": 1, "d2": 1}}, run)["q"]["ndcg@10"]
    assert binary == pytest.approx(1.0) and graded < binary  # grades change nDCG
    assert m["recall@1"] == 0.5 and m["recall@5"] == 1.0  # a fraction of the relevant set
    assert m["hit@1"] == 1.0 and m["mrr@10"] == 1.0
    assert m["map"] == pytest.approx((1 / 1 + 2 / 2) / 2) and m["p@10"] == pytest.approx(0.2)


def test_unretrieved_query_scores_zero_and_identical_ids_are_ignored() -> None:
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    per = per_query(qrels, {"q1": [("q1", 0.9), ("a", 0.5)]}, ["hit@1", "ndcg@10"])
    assert per["q2"] == {"hit@1": 0.0, "ndcg@10": 0.0}  # asked, nothing came back
    assert per["q1"]["hit@1"] == 0.0
    per = per_query(qrels, {"q1": [("q1", 0.9), ("a", 0.5)]}, ["hit@1"], ignore_identical_ids=True)
    assert per["q1"]["hit@1"] == 1.0  # the query's own id no longer counts


def test_qrels_read_beir_and_trec_formats_and_beir_keeps_grades(tmp_path: Path) -> None:
    beir = tmp_path / "b.tsv"
    beir.write_text("query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t0\nq2\td3\t1\n")
    trec = tmp_path / "t.qrels"
    trec.write_text("q1 0 d1 2\nq1 0 d2 0\nq2 0 d3 1\n")
    assert read_qrels(beir) == read_qrels(trec) == {"q1": {"d1": 2, "d2": 0}, "q2": {"d3": 1}}
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels/test.tsv").write_text(beir.read_text())
    (tmp_path / "queries.jsonl").write_text('{"_id": "q1", "text": "a"}\n{"_id": "q2", "text": "b"}\n')
    items = load_dataset(tmp_path)
    assert items[0].qrels == {"d1": 2, "d2": 0} and items[0].gold_ids == ["d1"]
    bad = tmp_path / "bad.qrels"
    bad.write_text("q1 d1\n")
    with pytest.raises(Exception, match=r"bad\.qrels:1: qrels rows"):
        read_qrels(bad)


def test_run_file_round_trip_gives_the_same_scores(tmp_path: Path) -> None:
    qrels = {"q1": {"a": 2, "b": 1}, "q2": {"c": 1}}
    run = {"q1": [("b", 3.5), ("x", 2.25), ("a", 1.0)], "q2": [("c", 0.5)]}
    write_run(tmp_path / "run.trec", run, tag="t")
    assert (tmp_path / "run.trec").read_text().splitlines()[0] == "q1 Q0 b 1 3.500000 t"
    back = read_run(tmp_path / "run.trec")
    assert back == run and per_query(qrels, back) == per_query(qrels, run)


def test_paired_test_known_answers() -> None:
    a = [0.5 + i / 100 for i in range(30)]
    assert paired_p_value(a, [x - 0.2 for x in a]) < 0.001  # always better: significant
    assert paired_p_value(a, a) == 1.0
    rng = random.Random(1)
    same_dist = [rng.random() for _ in range(60)]
    shuffled = same_dist[30:] + same_dist[:30]
    assert paired_p_value(same_dist, shuffled) > 0.05  # no systematic difference


def test_compare_adjusts_within_each_metric() -> None:
    ids = [str(i) for i in range(30)]
    per = {"A": {q: {"m": 1.0} for q in ids},
           "B": {q: {"m": 0.0} for q in ids},
           "C": {q: {"m": float(i % 2)} for i, q in enumerate(ids)}}
    rows = {(r["a"], r["b"]): r for r in compare(per)}
    assert set(rows) == {("A", "B"), ("A", "C"), ("B", "C")}
    assert rows[("A", "B")]["diff"] == 1.0 and rows[("A", "B")]["significant"]
    ps = sorted(r["p"] for r in rows.values())
    # Benjamini-Hochberg: the largest p is unchanged, the others scaled by m / rank (then capped)
    assert max(r["p_adjusted"] for r in rows.values()) == pytest.approx(ps[-1])
    assert all(r["p_adjusted"] >= r["p"] for r in rows.values())


def test_eval_writes_run_files_and_runs_compare_without_recomputing(tmp_path: Path) -> None:
    pfile = _pipeline_file(tmp_path)
    for name in ("one", "two"):
        evaluate([pfile], _data(tmp_path), out=tmp_path / name, use_ctxs=True, progress=False,
                 pipelines={str(pfile): scripted_pipeline()})
    run = read_run(tmp_path / "one/scripted/run.trec")
    assert set(run) == {"q1", "q2", "q3"} and all(tag for tag in run.values())
    result = compare_runs([tmp_path / "one", tmp_path / "two"], tmp_path / "cmp")
    names = {(r["a"], r["b"]) for r in result["comparisons"]}
    assert names == {("one/scripted", "two/scripted")}
    assert all(r["p"] == 1.0 and r["diff"] == 0.0 for r in result["comparisons"])  # identical runs
    assert (tmp_path / "cmp/comparison.md").read_text().startswith("# Comparison:")
    assert "<table>" in (tmp_path / "cmp/comparison.html").read_text()


# --- fusion --------------------------------------------------------------------------------------


def _hits(ids: list[str], scores: list[float] | None = None) -> list[Hit]:
    scores = scores or [1.0 - i / 100 for i in range(len(ids))]
    return [Hit(passage=Passage(id=d, text=d), score=s, rank=i + 1) for i, (d, s) in enumerate(zip(ids, scores))]


def test_fuse_weights_and_methods_hand_computed() -> None:
    dense, sparse = _hits(["a", "b"], [0.9, 0.5]), _hits(["b", "c"], [12.0, 2.0])
    rrf = dict(fuse(dense, sparse, method="rrf", dense_weight=0.25, rrf_k=60))
    assert rrf["b"] == pytest.approx(0.25 / 62 + 0.75 / 61) and rrf["a"] == pytest.approx(0.25 / 61)
    mm = dict(fuse(dense, sparse, method="minmax", dense_weight=0.25))
    assert mm == {"a": pytest.approx(0.25), "b": pytest.approx(0.75), "c": 0.0}
    assert [d for d, _ in fuse(dense, sparse, dense_weight=1.0)][:2] == ["a", "b"]  # dense alone


def _synthetic(good: str, n: int = 80) -> tuple[list[EvalItem], dict[str, list[Hit]], dict[str, list[Hit]]]:
    """One side ranks the gold passage first, the other ranks it 8th."""
    rng = random.Random(0)
    items, dense, sparse = [], {}, {}
    for i in range(n):
        q = f"q{i}"
        others = [f"{q}-x{j}" for j in range(20)]
        rng.shuffle(others)
        perfect, poor = [f"{q}-gold", *others], [*others[:7], f"{q}-gold", *others[7:]]
        items.append(EvalItem(id=q, question=q, gold_ids=[f"{q}-gold"]))
        dense[q], sparse[q] = (_hits(perfect), _hits(poor)) if good == "dense" else (_hits(poor), _hits(perfect))
    return items, dense, sparse


@pytest.mark.parametrize("good", ["dense", "bm25"])
def test_tuned_fusion_finds_the_better_side_and_never_loses_on_held_out(good: str) -> None:
    items, dense, sparse = _synthetic(good)
    result = tune(items, dense, sparse)
    table = result["held_out"]
    assert table["tuned"] >= max(table["dense"], table["bm25"]) - 1e-12
    assert (result["fusion"]["dense_weight"] > 0.5) == (good == "dense")
    tune_ids, held_ids = ({it.id for it in part} for part in split(items))
    assert tune_ids and held_ids and not tune_ids & held_ids and len(tune_ids | held_ids) == 80


def test_eval_item_judgments_default_to_gold_ids() -> None:
    assert EvalItem(id="1", question="q", gold_ids=["a"]).judgments == {"a": 1}
    assert EvalItem(id="1", question="q", gold_ids=["a"], qrels={"a": 2, "b": 0}).judgments == {"a": 2, "b": 0}


def test_summary_carries_comparisons(tmp_path: Path) -> None:
    p1, p2 = _pipeline_file(tmp_path, "s1"), _pipeline_file(tmp_path, "s2")
    summary = evaluate([p1, p2], _data(tmp_path), out=tmp_path / "o", use_ctxs=True, progress=False,
                       pipelines={str(p1): scripted_pipeline(), str(p2): scripted_pipeline()})
    assert summary["comparisons"] and summary["significance_test"].startswith("paired randomization")
    saved = json.loads((tmp_path / "o/summary.json").read_text())
    assert saved["comparisons"] == summary["comparisons"]
    html = (tmp_path / "o/report.html").read_text()
    assert "latency.png" in html and "Significance" in html


# --- answer judge --------------------------------------------------------------------------------


def test_answer_judge_reads_yes_against_no_and_reports_agreement() -> None:
    import asyncio

    from rag.eval.judge import AnswerJudge, agreement, auc
    from rag.generation.scripted import ScriptedGenerator
    from rag.prompts import get_format
    from rag.types import Generation

    g = ScriptedGenerator()
    yes, no = g.first_token_ids(["Yes", "No"])

    def verdict(p_yes: float) -> Generation:
        return Generation(text="Yes", token_ids=[yes], token_logprobs=[math.log(p_yes)],
                          logprobs=[{yes: math.log(p_yes), no: math.log(1 - p_yes)}], finish_reason="length")

    # supported only when the passage says Paris; the answer is relevant unless it is "Nile"
    g.script = [(lambda p: "Passages:" in p and "Paris" in p.split("Answer:")[0], verdict(0.9)),
                (lambda p: "Passages:" in p, verdict(0.2)),
                (lambda p: "Answer: Nile" in p, verdict(0.3))]
    g.default = verdict(0.8)
    judge = AnswerJudge(g, get_format("chatml"))
    paris, nile = Passage(id="p", title="France", text="Paris is the capital."), Passage(id="n", text="The Nile.")
    out = asyncio.run(judge.judge([("Capital?", "Paris", [paris]), ("Capital?", "Nile", [nile]),
                                   ("Capital?", "Paris", [])]))
    assert out[0] == {"faithfulness": pytest.approx(0.9), "answer_relevance": pytest.approx(0.8)}
    assert out[1] == {"faithfulness": pytest.approx(0.2), "answer_relevance": pytest.approx(0.3)}
    assert out[2] == {"answer_relevance": pytest.approx(0.8)}  # nothing cited: no faithfulness
    checks = asyncio.run(judge.check([("Capital?", ["Paris"], paris), ("Capital?", ["Paris"], nile)]))
    assert checks == [(1, pytest.approx(0.9)), (0, pytest.approx(0.2))]  # gold label: answer in passage
    assert agreement(checks) == 1.0 and agreement([(1, 0.4), (0, 0.1)]) == 0.5
    assert auc(checks) == 1.0 and auc([(1, 0.4), (0, 0.1)]) == 1.0  # ranks right, threshold wrong
    assert auc([(1, 0.2), (1, 0.6), (0, 0.4), (0, 0.4)]) == pytest.approx(0.5)
    assert math.isnan(auc([(1, 0.3)]))
