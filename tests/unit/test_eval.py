"""Metrics on hand-worked examples, loaders, and end-to-end eval runs with a scripted pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rag.config import pipeline_config
from rag.errors import CorpusError
from rag.eval.datasets import EvalItem, load_dataset
from rag.eval.metrics import (
    bootstrap_ci,
    exact_match,
    f1,
    match,
    match_normalized,
    normalize_answer,
)
from rag.eval.runner import evaluate, score_item
from rag.generation.scripted import ScriptedGenerator, text_generation
from rag.pipeline import ChatRagPipeline, RetrievalPipeline
from rag.types import ChatMessage, Hit, Passage
from tests.unit.conftest import FixedRetriever


def test_normalisation_edge_cases() -> None:
    assert normalize_answer("The Cat's  hat!") == "cats hat"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert normalize_answer("") == ""


def test_em_f1_match_hand_worked() -> None:
    golds = ["Denver Broncos", "Broncos"]
    assert exact_match("the Broncos.", golds) == 1.0
    assert exact_match("Denver", golds) == 0.0
    assert f1("Denver", golds) == pytest.approx(2 * 1 * 0.5 / 1.5)  # p=1, r=1/2
    assert f1("the Denver Broncos won", golds) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert f1("", golds) == 0.0 and exact_match("", golds) == 0.0
    assert f1("the", ["a"]) == 1.0  # both normalise to empty
    assert match("It was the Broncos", golds) == 1.0
    assert match("it was the broncos", golds) == 0.0  # case-sensitive like Self-RAG
    assert match_normalized("it was the broncos", golds) == 1.0
    assert match_normalized("anything", [""]) == 0.0  # an empty gold never matches


def test_bootstrap_interval() -> None:
    lo, hi = bootstrap_ci([0.0, 1.0] * 50)
    assert lo < 0.5 < hi and hi - lo < 0.3


@pytest.mark.parametrize(("rel", "fmt", "count"), [
    ("selfrag-eval-ctrla/popqa_longtail.jsonl", "selfrag", 1399),
    ("selfrag-eval-ctrla/triviaqa_test_1000.jsonl", "selfrag", 1000),
    ("flashrag-qa-subsamples/nq_test.jsonl", "flashrag", 1000),
    ("nq-open/NQ-open.dev.jsonl", "nq", 3610),
    ("arc-challenge/ARC-Challenge-Test.jsonl", "arc", 1172),
    ("squad-v1.1-dev/dev-v1.1.json", "squad", 10570),
    ("beir-scifact", "beir", 300),
])
def test_loaders_on_shared_data(shared_data: Path, rel: str, fmt: str, count: int) -> None:
    from rag.eval.datasets import detect_format

    assert detect_format(shared_data / rel) == fmt
    items = load_dataset(shared_data / rel)
    assert len(items) == count
    assert all(it.question for it in items[:50])
    assert all(it.answers or it.gold_ids for it in items[:50])
    if fmt == "arc":
        assert items[0].closed and items[0].answer_key in [c[0] for c in items[0].choices or []]
        assert "\nA: " in items[0].prompt_text()
    if fmt == "squad":
        assert items[0].gold_ids == ["Super_Bowl_50#0"]


def test_malformed_question_line_names_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "q.jsonl"
    f.write_text('{"question": "a", "answers": ["x"]}\n{"question": "b"}\n')
    with pytest.raises(CorpusError, match=r"q\.jsonl:2: missing field 'answers'"):
        load_dataset(f, "selfrag")


def _data(tmp_path: Path) -> Path:
    rows = [{"id": "q1", "question": "capital of France", "answers": ["Paris"],
             "ctxs": [{"id": "c1", "title": "France", "text": "Paris is the capital."}]},
            {"id": "q2", "question": "longest river", "answers": ["Nile"],
             "ctxs": [{"id": "c2", "title": "Rivers", "text": "The Amazon is long."}]},
            {"id": "q3", "question": "author of Hamlet", "answers": ["Shakespeare", "William Shakespeare"],
             "ctxs": [{"id": "c3", "title": "Hamlet", "text": "Written by Shakespeare."}]}]
    f = tmp_path / "q.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


PREDICTIONS = {"capital of France": "Paris", "longest river": "the Amazon",
               "author of Hamlet": "It was william shakespeare"}


def scripted_pipeline() -> ChatRagPipeline:
    def answer_for(prompt: str):  # type: ignore[no-untyped-def]
        q = next(q for q in PREDICTIONS if q in prompt)
        return text_generation(PREDICTIONS[q])
    gen = ScriptedGenerator(default=answer_for)
    return ChatRagPipeline(pipeline_config(name="scripted", prompt={"format": "chatml"}), gen)


def _pipeline_file(tmp_path: Path, name: str = "scripted", expected: str = "") -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(f"name: {name}\nprompt: {{format: chatml}}\n{expected}")
    return p


def test_scripted_pipeline_gives_exactly_known_metrics(tmp_path: Path) -> None:
    pfile = _pipeline_file(tmp_path)
    summary = evaluate([pfile], _data(tmp_path), out=tmp_path / "out", use_ctxs=True, progress=False,
                       pipelines={str(pfile): scripted_pipeline()})
    (p,) = summary["pipelines"]
    m = {k: v["mean"] for k, v in p["metrics"].items()}
    assert m["em"] == pytest.approx(1 / 3)
    assert m["match"] == pytest.approx(1 / 3)  # "william shakespeare" != "Shakespeare" case-sensitively
    assert m["match_norm"] == pytest.approx(2 / 3)
    f1_q3 = 2 * (2 / 4) * 1 / (2 / 4 + 1)  # "it was william shakespeare" vs "william shakespeare"
    assert m["f1"] == pytest.approx((1 + 0 + f1_q3) / 3)
    assert m["hit@1"] == pytest.approx(2 / 3)  # answer string in the given passage: q1, q3
    assert "recall@1" not in m  # no gold passages: only the answer-string hit@k
    recs = [json.loads(x) for x in (tmp_path / "out/scripted/predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == ["q1", "q2", "q3"] and recs[0]["citations"][0]["id"] == "c1"
    assert (tmp_path / "out/report.md").exists() and (tmp_path / "out/metrics.png").stat().st_size > 1000
    report = (tmp_path / "out/report.md").read_text()
    assert "| scripted |" in report and "case-sensitive" in report


def test_resume_skips_finished_items_and_gives_the_same_summary(tmp_path: Path) -> None:
    pfile, data = _pipeline_file(tmp_path), _data(tmp_path)
    full = evaluate([pfile], data, out=tmp_path / "a", use_ctxs=True, progress=False,
                    pipelines={str(pfile): scripted_pipeline()})
    # an interrupted run: the first record and half of the second were written
    lines = (tmp_path / "a/scripted/predictions.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "b/scripted").mkdir(parents=True)
    (tmp_path / "b/scripted/predictions.jsonl").write_text(lines[0] + lines[1][:20])
    pipe = scripted_pipeline()
    resumed = evaluate([pfile], data, out=tmp_path / "b", use_ctxs=True, resume=True, progress=False,
                       pipelines={str(pfile): pipe})
    assert sum(len(c) for c in pipe.generator.calls) == 2  # q1 was not redone
    assert resumed["pipelines"][0]["metrics"] == full["pipelines"][0]["metrics"]
    ids = [json.loads(x)["id"] for x in (tmp_path / "b/scripted/predictions.jsonl").read_text().splitlines()]
    assert ids == ["q1", "q2", "q3"]


def test_check_reports_drift(tmp_path: Path) -> None:
    pfile = _pipeline_file(tmp_path, expected="expected:\n  tolerance: 0.01\n  metrics: {em: 0.9, f1: 0.555}\n")
    summary = evaluate([pfile], _data(tmp_path), out=tmp_path / "o", use_ctxs=True, progress=False,
                       pipelines={str(pfile): scripted_pipeline()})
    (problem,) = summary["pipelines"][0]["check"]
    assert problem.startswith("scripted: em = 0.3333, expected 0.9000")


def test_retrieval_pipeline_scores_gold_passages() -> None:
    r = FixedRetriever(lambda q: [Hit(passage=Passage(id=i, text="t"), score=0.9 - r / 10, rank=r + 1)
                                  for r, i in enumerate(["x", "gold", "y"])])
    pipe = RetrievalPipeline(pipeline_config(name="r", kind="retrieval", retrieval={"top_k": 3}), r)
    (a,) = pipe.answer_batch([[ChatMessage(role="user", content="q")]])
    m = score_item(EvalItem(id="1", question="q", gold_ids=["gold"]), a, answer_metrics=False)
    assert m == {"recall@1": 0.0, "recall@5": 1.0, "recall@20": 1.0, "recall@100": 1.0, "hit@1": 0.0,
                 "hit@5": 1.0, "hit@20": 1.0, "mrr@10": 0.5, "map": 0.5, "p@10": pytest.approx(0.1),
                 "ndcg@10": pytest.approx(1 / 1.584962500721156)}
