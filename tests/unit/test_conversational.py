"""Conversational retrieval: the conversational question-set folder (MTRAG's layout), the query
strategies (last turn, history fusion, rewrite) with the query recorded, and `rag eval`'s
per-turn-type measures and long-answer F1 and ROUGE-L on a small folder made here."""

from __future__ import annotations

import asyncio
import json
import statistics
from pathlib import Path
from typing import Any

import pytest

from rag.config import pipeline_config
from rag.errors import ConfigError, CorpusError
from rag.eval.datasets import EvalItem, detect_format, load_dataset
from rag.eval.metrics import f1, rouge_l
from rag.generation.scripted import ScriptedGenerator, text_generation
from rag.pipeline import ChatRagPipeline, RetrievalPipeline
from rag.pipeline.queries import history_query
from rag.retriever import fuse
from rag.types import ChatMessage, Passage
from tests.unit.conftest import memory_retriever

PASSAGES = [Passage(id="lin", title="Lord Linlithgow", text="Lord Linlithgow was Viceroy of India from 1936 to 1943."),
            Passage(id="quit", title="Quit India", text="The Quit India Movement began in August 1942."),
            Passage(id="gandhi", title="Gandhi", text="Gandhi led the Quit India Movement and was arrested."),
            Passage(id="tea", title="Tea", text="Tea is grown in Assam and Darjeeling.")]
TURNS = [
    {"id": "c1_1", "conversation_id": "c1", "turn": 1, "multi_turn": "N/A",
     "messages": [{"role": "user", "content": "who was viceroy during quit india"}],
     "golden_answers": ["Lord Linlithgow was the Viceroy."], "gold_passages": ["lin"]},
    {"id": "c1_2", "conversation_id": "c1", "turn": 2, "multi_turn": "Follow-up",
     "messages": [{"role": "user", "content": "who was viceroy during quit india"},
                  {"role": "assistant", "content": "Lord Linlithgow was the Viceroy."},
                  {"role": "user", "content": "when did his term end?"}],
     "golden_answers": ["His term as Viceroy ended in 1943."], "gold_passages": ["lin"]},
    {"id": "c1_3", "conversation_id": "c1", "turn": 3, "multi_turn": "Clarification",
     "messages": [{"role": "user", "content": "who led it"}],
     "golden_answers": ["Gandhi led the movement."], "gold_passages": []},
]


def folder(tmp_path: Path) -> Path:
    (tmp_path / "conversations.jsonl").write_text("".join(json.dumps(t) + "\n" for t in TURNS))
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nc1_1\tlin\t1\nc1_2\tlin\t1\nc1_3\tgandhi\t1\n")
    return tmp_path


def test_conversational_folder_is_detected_and_read(tmp_path: Path) -> None:
    path = folder(tmp_path)
    assert detect_format(path) == "conversations"
    items = load_dataset(path)
    assert [(it.id, it.group, it.gold_ids) for it in items] == [
        ("c1_1", "first", ["lin"]), ("c1_2", "follow-up", ["lin"]), ("c1_3", "clarification", ["gandhi"])]
    assert items[1].conversation()[-1].content == "when did his term end?" and len(items[1].conversation()) == 3
    assert items[1].long_answers and items[1].answers == ["His term as Viceroy ended in 1943."]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "conversations.jsonl").write_text(json.dumps({"id": "x", "messages": [{"role": "assistant",
                                                                                   "content": "hi"}]}) + "\n")
    with pytest.raises(CorpusError, match=r"conversations.jsonl:1: .messages. must end with the user turn"):
        load_dataset(bad)


def test_history_query_joins_the_messages_before_the_last_turn() -> None:
    convo = [ChatMessage(**m) for m in TURNS[1]["messages"]]  # type: ignore[arg-type]
    assert history_query(convo, 1) == "Lord Linlithgow was the Viceroy. when did his term end?"
    assert history_query(convo, 0) == "who was viceroy during quit india when did his term end?"
    assert history_query(convo[:1], 2) == "who was viceroy during quit india"


def test_history_strategy_fuses_the_two_rankings_and_records_the_query() -> None:
    retriever = memory_retriever(PASSAGES)
    convo = [ChatMessage(**m) for m in TURNS[1]["messages"]]  # type: ignore[arg-type]
    pipe = RetrievalPipeline(pipeline_config(name="h", kind="retrieval", retrieval={
        "top_k": 3, "query": "history", "history_weight": 0.4, "history_messages": 2}), retriever)
    (answer,) = pipe.answer_batch([convo])
    last, joined = convo[-1].content, history_query(convo, 2)
    one, both = retriever.search(last, 20), retriever.search(joined, 20)
    want = fuse(one, both, method="rrf", dense_weight=0.6)[:3]
    assert [(h.passage.id, h.score) for h in answer.hits] == [(pid, pytest.approx(s)) for pid, s in want]
    assert answer.trace.query == f"{last} || {joined}"
    (first,) = pipe.answer_batch([convo[:1]])  # a first turn: searched once, by itself
    assert [h.passage.id for h in first.hits] == [h.passage.id for h in retriever.search(convo[0].content, 3)]
    assert first.trace.query == convo[0].content


def test_rewrite_searches_the_generators_question_and_needs_a_generator() -> None:
    retriever = memory_retriever(PASSAGES)
    rewritten = text_generation("When did Linlithgow's term end?")
    gen = ScriptedGenerator(script=[(lambda p: "ideal search query" in p, rewritten)],
                            default=text_generation("In 1943."))
    pipe = ChatRagPipeline(pipeline_config(name="r", prompt={"format": "chatml"}, retrieval={"top_k": 2},
                                           query_rewrite=True), gen, retriever)
    assert pipe.config.retrieval.query == "rewrite"  # the older spelling
    (answer,) = pipe.answer_batch([[ChatMessage(**m) for m in TURNS[1]["messages"]]])  # type: ignore[arg-type]
    assert answer.trace.query == "When did Linlithgow's term end?"
    assert [h.passage.id for h in answer.hits] == [h.passage.id for h in retriever.search(answer.trace.query, 2)]
    with pytest.raises(ConfigError, match="needs a generator"):
        pipeline_config(name="x", kind="retrieval", retrieval={"query": "rewrite"})
    with pytest.raises(ConfigError, match="must be last_turn for kind: selfrag"):
        pipeline_config(name="x", kind="selfrag", retrieval={"query": "history"})


def test_hyde_fuses_the_last_turn_with_the_written_passage_from_the_first_turn_on() -> None:
    retriever = memory_retriever(PASSAGES)
    written = "Linlithgow, Viceroy of India, left office in 1943 after the Quit India Movement."
    gen = ScriptedGenerator(script=[(lambda p: "encyclopedia passage" in p and "quit india" in p,
                                     text_generation(f"  {written}\n"))], default=text_generation("In 1943."))
    pipe = ChatRagPipeline(pipeline_config(name="h", prompt={"format": "chatml"}, retrieval={
        "top_k": 3, "query": "hyde", "hyde_weight": 0.3}), gen, retriever)
    for convo in (TURNS[1]["messages"], TURNS[0]["messages"]):  # a follow-up, and a first turn
        (answer,) = pipe.answer_batch([[ChatMessage(**m) for m in convo]])  # type: ignore[arg-type]
        last = convo[-1]["content"]
        want = fuse(retriever.search(last, 20), retriever.search(written, 20), method="rrf", dense_weight=0.7)[:3]
        assert [(h.passage.id, h.score) for h in answer.hits] == [(pid, pytest.approx(s)) for pid, s in want]
        assert answer.trace.query == f"{last} || {written}"
    with pytest.raises(ConfigError, match="hyde needs a generator"):
        pipeline_config(name="x", kind="retrieval", retrieval={"query": "hyde"})


def test_eval_reports_per_turn_type_and_long_answer_f1_rouge_not_exact_match(tmp_path: Path) -> None:
    from rag.eval.runner import evaluate

    (tmp_path / "data").mkdir()
    data = folder(tmp_path / "data")
    file = tmp_path / "chat.yaml"
    file.write_text("name: chat\nprompt: {format: chatml}\nretrieval: {top_k: 2, query: history}\n")
    answer = "Linlithgow served until 1943 as Viceroy"
    pipe = ChatRagPipeline(pipeline_config(name="chat", prompt={"format": "chatml"},
                                           retrieval={"top_k": 2, "query": "history"}),
                           ScriptedGenerator(default=text_generation(answer)), memory_retriever(PASSAGES))
    summary = asyncio.run(asyncio.to_thread(evaluate, [file], data, out=tmp_path / "run", progress=False,
                                            pipelines={str(file): pipe}))
    result: dict[str, Any] = summary["pipelines"][0]
    assert set(result["by_group"]) == {"first", "follow-up", "clarification"}
    assert all(g["n"] == 1 for g in result["by_group"].values())
    assert "em" not in result["metrics"] and "match" not in result["metrics"]
    want = [f1(answer, [t["golden_answers"][0]]) for t in TURNS]  # the follow-up's by hand below
    assert result["metrics"]["f1"]["mean"] == pytest.approx(sum(want) / 3)
    # follow-up: prediction tokens {linlithgow, served, until, 1943, as, viceroy}, gold {his, term, as,
    # viceroy, ended, in, 1943} after SQuAD normalisation: 3 shared -> P 3/6, R 3/7, F1 6/13
    assert result["by_group"]["follow-up"]["metrics"]["f1"]["mean"] == pytest.approx(6 / 13)
    # ROUGE-L by hand: the longest common subsequence of stemmed tokens. Follow-up: "as viceroy"
    # (2 of 6 predicted, 2 of 7 gold tokens) -> F 4/13; first turn: "linlithgow ... viceroy" (2 of 6,
    # 2 of 5) -> 4/11; clarification: nothing shared -> 0
    by_group = {g: r["metrics"]["rouge_l"]["mean"] for g, r in result["by_group"].items()}
    assert by_group == {"follow-up": pytest.approx(4 / 13), "first": pytest.approx(4 / 11), "clarification": 0.0}
    assert result["metrics"]["rouge_l"]["mean"] == pytest.approx((4 / 13 + 4 / 11) / 3)
    assert rouge_l("Linlithgow SERVED", ["he serves"]) == pytest.approx(0.5)  # stemmed, case-folded
    assert "By question group" in (tmp_path / "run" / "report.md").read_text()


def test_tune_query_picks_on_the_tuning_half_and_reports_held_out(tmp_path: Path) -> None:
    from rag.eval.fusion import _score, split
    from rag.eval.query import tune_query

    turns = []
    for i, p in enumerate(PASSAGES * 3):  # follow-ups whose referent is only in the previous answer
        turns.append({"id": f"t{i}", "multi_turn": "Follow-up", "gold_passages": [p.id], "messages": [
            {"role": "user", "content": "tell me something"}, {"role": "assistant", "content": p.text},
            {"role": "user", "content": ["and then?", "why is that?", "what else?"][i % 3]}]})
    (tmp_path / "conversations.jsonl").write_text("".join(json.dumps(t) + "\n" for t in turns))
    items = load_dataset(tmp_path)
    retriever = memory_retriever(PASSAGES)
    pipe = RetrievalPipeline(pipeline_config(name="r", kind="retrieval", retrieval={"top_k": 4}), retriever)
    result = tune_query(items, pipe, held_out=0.5, seed=3, depth=4)
    tune_items, held = split(items, 0.5, 3)
    assert (result["tune_queries"], result["held_out_queries"]) == (len(tune_items), len(held))
    assert result["gain_bound"] == max(g["gain_bound"] for g in result["grid"])  # chosen by the bound
    assert {g["query"] for g in result["grid"]} == {"last_turn", "history"}  # no generator calls without llm
    assert result["query"]["query"] == "history"  # the previous answer names the passage
    last = {it.id: [(h.passage.id, -n) for n, h in enumerate(retriever.search(it.question, 4))] for it in items}
    assert result["held_out"]["last_turn"] == pytest.approx(_score(held, last, "ndcg@10"))
    assert result["held_out"]["tuned"] > result["held_out"]["last_turn"]
    # what was tuned is what the pipeline runs: the choice's held-out score from conversation_hits
    chosen = RetrievalPipeline(pipeline_config(name="c", kind="retrieval", retrieval={"top_k": 4, **result["query"]}),
                               retriever)
    hits, _ = asyncio.run(chosen.conversation_hits([it.messages or [] for it in items], 4))
    ran = {it.id: [(h.passage.id, -n) for n, h in enumerate(hs)] for it, hs in zip(items, hits, strict=True)}
    assert result["held_out"]["tuned"] == pytest.approx(_score(held, ran, "ndcg@10"))
    # the bound by hand: mean per-turn gain over last_turn on the tuning half, less one standard error
    gains = [_score([it], ran, "ndcg@10") - _score([it], last, "ndcg@10") for it in tune_items]
    want = statistics.fmean(gains) - statistics.stdev(gains) / len(gains) ** 0.5
    assert result["gain_bound"] == pytest.approx(want) and 0 < want < statistics.fmean(gains)
    assert result["tune_score"] == pytest.approx(_score(tune_items, ran, "ndcg@10"))


def test_gain_bound_prefers_a_steady_gain_to_a_larger_swinging_one() -> None:
    from rag.eval.query import gain_bound

    turns = [EvalItem(id=f"t{i}", question="q") for i in range(6)]
    base = dict.fromkeys((it.id for it in turns), 0.5)
    steady = dict.fromkeys(base, 0.6)  # +0.1 on every turn
    swinging = dict(zip(base, [1.0, 1.0, 1.0, 0.2, 0.2, 0.3], strict=True))  # mean gain +0.117
    assert gain_bound(steady, base, turns) == pytest.approx(0.1)
    gains = [0.5, 0.5, 0.5, -0.3, -0.3, -0.2]
    want = statistics.fmean(gains) - statistics.stdev(gains) / 6**0.5
    assert gain_bound(swinging, base, turns) == pytest.approx(want)
    assert gain_bound(swinging, base, turns) < 0 < gain_bound(steady, base, turns)


def test_tune_query_with_llm_tries_rewrite_and_hyde_written_once_per_turn(tmp_path: Path) -> None:
    from rag.eval.query import HYDE_WEIGHTS, tune_query

    turns = [{"id": f"t{i}", "gold_passages": [p.id], "messages": [
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
        {"role": "user", "content": f"question {i}"}]} for i, p in enumerate(PASSAGES * 2)]
    (tmp_path / "conversations.jsonl").write_text("".join(json.dumps(t) + "\n" for t in turns))
    gold = {f"question {i}": p for i, p in enumerate(PASSAGES * 2)}

    def writes(prompt: str) -> Any:  # the rewrite is the gold passage's title; hyde writes its text
        q = next(q for q in gold if f"user: {q}<|im_end|>" in prompt)
        return text_generation(gold[q].text if "encyclopedia passage" in prompt else gold[q].title)

    gen = ScriptedGenerator(default=writes)
    pipe = ChatRagPipeline(pipeline_config(name="c", prompt={"format": "chatml"}, retrieval={"top_k": 4}), gen,
                           memory_retriever(PASSAGES))
    result = tune_query(load_dataset(tmp_path), pipe, held_out=0.5, seed=1, depth=4, llm=True)
    assert len(gen.calls) == 2 * len(turns)  # one rewrite and one passage per turn, whatever the grid size
    grid = {(g["query"], g.get("hyde_weight")): g["score"] for g in result["grid"]}
    assert {("rewrite", None), *(("hyde", w) for w in HYDE_WEIGHTS)} <= set(grid)
    assert grid[("rewrite", None)] == pytest.approx(1.0) and grid[("last_turn", None)] < 1.0
    assert result["query"]["query"] in ("rewrite", "hyde") and result["held_out"]["tuned"] == pytest.approx(1.0)


def test_the_packaged_default_pipeline_searches_a_follow_up_with_the_previous_answer(tmp_path: Path) -> None:
    """``rag chat``, ``rag serve`` and the playground without -p: a follow-up is searched with the
    answer before it too (history), a first turn once, as itself."""
    from rag.config import DEFAULT_PIPELINE, IndexRecipe, load_pipeline_config
    from rag.index import build_index
    from rag.pipeline import ChatRagPipeline, build_pipeline

    corpus = tmp_path / "people.jsonl"
    corpus.write_text("".join(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n" for p in PASSAGES))
    build_index(IndexRecipe(name="p", corpus=str(corpus), out=str(tmp_path / "idx"), embedder="hash:64"),
                progress=False)
    pipe = build_pipeline(load_pipeline_config(DEFAULT_PIPELINE), index=tmp_path / "idx", generator=ScriptedGenerator())
    assert isinstance(pipe, ChatRagPipeline)
    first, follow_up = [TURNS[0]["messages"], TURNS[1]["messages"]]
    hits, queries = asyncio.run(pipe.conversation_hits([[ChatMessage(**m) for m in c] for c in (first, follow_up)], 3))
    joined = history_query([ChatMessage(**m) for m in follow_up], 1)
    assert queries == ["who was viceroy during quit india", f"when did his term end? || {joined}"]
    assert "Lord Linlithgow was the Viceroy." in joined
    last, prev = (pipe.retriever.search(q, 20) for q in ("when did his term end?", joined))  # fused: 20 deep
    fused = fuse(last, prev, method="rrf", dense_weight=0.8)[:3]
    assert [h.passage.id for h in hits[1]] == [pid for pid, _ in fused]
    pipe.close()


def test_rag_tune_query_writes_the_choice_into_the_pipeline_file(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from rag.cli import app as cli_app
    from rag.config import load_yaml

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n" for p in PASSAGES))
    runner = CliRunner()
    built = runner.invoke(cli_app, ["index", "build", "--corpus", str(corpus), "--out", str(tmp_path / "idx"),
                                    "--embedder", "hash:64", "-q"])
    assert built.exit_code == 0, built.output
    data = tmp_path / "turns"
    data.mkdir()
    (data / "conversations.jsonl").write_text("".join(json.dumps({
        "id": f"t{i}", "gold_passages": [p.id], "messages": [
            {"role": "user", "content": "tell me something"}, {"role": "assistant", "content": p.text},
            {"role": "user", "content": "and then?"}]}) + "\n" for i, p in enumerate(PASSAGES * 2)))
    pipe = tmp_path / "p.yaml"
    pipe.write_text("# mine\nname: p\nkind: retrieval\nretrieval: {mode: dense, top_k: 4}\n")
    r = runner.invoke(cli_app, ["tune", "query", "-p", str(pipe), "--data", str(data),
                                "--index", str(tmp_path / "idx")])
    assert r.exit_code == 0, r.output
    retrieval = load_yaml(pipe)["retrieval"]
    assert retrieval["query"] == "history" and retrieval["mode"] == "dense" and "history_weight" in retrieval
    assert pipe.read_text().startswith("# mine\n# rag tune query --data")
