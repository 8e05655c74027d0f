"""Self-RAG and SciPhi fidelity against the paper and the reference scripts' documented behaviour:
task presets, closed-task answers, ALCE citations, the long-form compat flags, the SciPhi
stop check and the card's call shape. Scripted generators with hand-written logprobs."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from rag.config import SelfRagSettings, load_pipeline_config, pipeline_config
from rag.errors import ConfigError, PromptError
from rag.eval.datasets import load_dataset
from rag.eval.runner import evaluate
from rag.generation.scripted import ScriptedGenerator, text_generation
from rag.pipeline import ChatRagPipeline, SelfRagPipeline
from rag.prompts import get_format, selfrag_paragraph
from rag.sciphi import SciPhiInterface, generation_params
from rag.selfrag.critic import TokenCritic
from rag.selfrag.decoder import SelfRagDecoder, cite
from rag.selfrag.scoring import normalise_closed_answer, vote
from rag.types import ChatMessage, GenerationParams, Passage
from tests.unit.conftest import FixedRetriever
from tests.unit.test_selfrag import TOK, candidate, hit, long_form, short_form, tree_rule

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "### Instruction:\n{q}\n\n### Response:\n"


# --- closed tasks ----------------------------------------------------------------------------


@pytest.mark.parametrize("text,choices,key", [
    ("A", None, "A"), ("(B) the moon", None, "B"), ("C.", None, "C"), ("D: shorter days", None, "D"),
    ("A bird is an animal", None, "a bird is an animal"),  # an article, not option A
    ("A true statement", None, "a true statement"),
    ("Planetary days will become shorter.", [("A", "Planetary density will decrease."),
                                             ("C", "Planetary days will become shorter.")], "C"),
    ("SUPPORTS", None, "true"), ("REFUTES.", None, "false"), ("True, it is.", None, "true"),
    ("no", None, "false"),
])
def test_closed_answers_normalise_like_the_paper_scores_them(text: str, choices: list[tuple[str, str]] | None,
                                                             key: str) -> None:
    assert normalise_closed_answer(text, choices) == key


def test_pubhealth_votes_do_not_split_between_true_and_supports() -> None:
    winner, sums = vote(["SUPPORTS", "true", "false"], [0.6, 0.5, 0.9])
    assert winner == "true" and sums == {"true": pytest.approx(1.1), "false": pytest.approx(0.9)}


def test_pubhealth_preset_maps_labels_and_instruction_is_the_papers() -> None:
    config = pipeline_config(name="p", kind="selfrag", selfrag={"task": "pubhealth", "mode": "always"})
    s = config.selfrag
    assert s.closed and config.retrieval.top_k == 5 and config.generation.max_new_tokens == 50
    g = ScriptedGenerator(default=candidate(0.9, "SUPPORTS", "full", 5), tokenizer=TOK)
    dec = SelfRagDecoder(g, TokenCritic(g, instruction=s.instruction), s, config.generation)
    (answer,) = short_form(dec, ["Vitamin C cures colds."], lambda qs, k: [[hit("a"), hit("b")]], 2)
    assert answer.text == "true"  # the reference maps SUPPORTS -> true before scoring
    assert g.calls[0][0].startswith(
        "### Instruction:\nIs the following statement correct or not? Say true if it's correct; otherwise "
        "say false.\n\n## Input:\n\nVitamin C cures colds.\n\n### Response:\n[Retrieval]<paragraph>")


def test_arc_loader_maps_numeric_labels_and_accuracy_reads_the_choice(tmp_path: Path) -> None:
    f = tmp_path / "arc.jsonl"
    f.write_text(json.dumps({"id": "q1", "question": "Which is a gas?", "answerKey": "3",
                             "choices": {"label": ["1", "2", "3", "4"], "text": ["ice", "rock", "steam", "wood"]}})
                 + "\n")
    (item,) = load_dataset(f)
    assert item.answer_key == "C" and item.choices is not None and item.choices[2] == ("C", "steam")
    assert item.prompt_text() == "Which is a gas?\nA: ice\nB: rock\nC: steam\nD: wood"
    from rag.eval.runner import score_item
    from rag.types import Answer

    assert score_item(item, Answer(text="C"))["accuracy"] == 1.0
    assert score_item(item, Answer(text="steam"))["accuracy"] == 1.0
    assert score_item(item, Answer(text="A bird is not a gas"))["accuracy"] == 0.0


# --- presets ----------------------------------------------------------------------------------


def test_task_preset_fills_what_the_file_leaves_out_also_from_the_command_line(tmp_path: Path) -> None:
    c = pipeline_config(name="p", kind="selfrag", selfrag={"task": "popqa"})
    s = c.selfrag
    assert (c.retrieval.top_k, c.generation.max_new_tokens, s.mode, s.threshold) == (10, 100, "adaptive", 0.2)
    c = pipeline_config(name="p", kind="selfrag", selfrag={"task": "popqa"}, retrieval={"top_k": 3})
    assert c.retrieval.top_k == 3  # the file's own setting wins
    c = pipeline_config(name="p", kind="selfrag", selfrag={"task": "asqa"})
    s = c.selfrag
    assert (s.decoding, s.mode, s.max_depth, c.generation.max_new_tokens) == ("long", "always", 7, 300)
    assert c.selfrag.instruction is not None and c.selfrag.instruction.endswith("answers.## Input:\n\n{question}")
    f = tmp_path / "p.yaml"
    f.write_text("name: p\nkind: selfrag\nretrieval: {top_k: 3}\nselfrag: {critic: prompted}\n")
    c = load_pipeline_config(f, task="arc_challenge")
    assert c.selfrag.task == "arc_challenge" and c.retrieval.top_k == 3 and c.selfrag.closed  # the file's
    assert c.generation.max_new_tokens == 50  # the preset's
    assert c.selfrag.critic == "prompted"
    f.write_text("name: p\n")
    with pytest.raises(ConfigError, match="--task arc_challenge needs a kind: selfrag pipeline"):
        load_pipeline_config(f, task="arc_challenge")
    f.write_text("name: p\nkind: selfrag\n")
    with pytest.raises(ConfigError, match="unknown task 'nq'"):
        load_pipeline_config(f, task="nq")


# --- long form ---------------------------------------------------------------------------------


def test_citations_stand_inside_the_sentence_as_alce_splits_it() -> None:
    assert cite("Paris is in France.", 1) == "Paris is in France [1]."
    assert cite("Is it?!", 2) == "Is it [2]?!"
    assert cite("no period", 3) == "no period [3]"


def test_segment_context_newest_keeps_only_the_latest_passage() -> None:
    def run(context: str) -> list[str]:
        g = ScriptedGenerator(default=tree_rule, tokenizer=TOK)
        s = SelfRagSettings(mode="always", decoding="long", beam_width=1, max_depth=3,
                            segment_retrieval="static", segment_context=context)  # type: ignore[arg-type]
        dec = SelfRagDecoder(g, TokenCritic(g), s, GenerationParams(max_new_tokens=50))
        long_form(dec, "Q", lambda qs, k: [[hit("a")] for _ in qs], 1)
        return g.calls[1]  # depth 2 prompts

    (all_,), (newest,) = run("all"), run("newest")
    assert all_.count("<paragraph>") == 2
    assert newest == (PROMPT.format(q="Q") + "[Relevant]Alpha one.[Fully supported]"
                      + "[Retrieval]<paragraph>Ta\ntext of a</paragraph>")


def test_compat_recipe_sets_every_script_behaviour() -> None:
    c = load_pipeline_config(ROOT / "pipelines/selfrag-long-compat.yaml")
    s = c.selfrag
    assert (s.path_score, s.select, s.segment_context) == ("product", "deepest", "newest")
    assert s.segment_retrieval == "static"
    assert (s.use_seq, s.w_use, s.compat_log_ratio, s.max_depth, s.mode) == (False, 0.0, False, 6, "always")
    assert c.retrieval.top_k == 5 and c.generation.max_new_tokens == 300 and s.task == "asqa"


def test_passage_without_title_keeps_the_newline() -> None:
    assert selfrag_paragraph(Passage(id="x", text="body")) == "[Retrieval]<paragraph>\nbody</paragraph>"


def test_rag_eval_long_form_writes_alce_records(tmp_path: Path) -> None:
    data = tmp_path / "asqa.json"
    data.write_text(json.dumps([{"sample_id": "s1", "question": "Q", "qa_pairs": [{"short_answers": ["Alpha"]}],
                                 "docs": [{"title": "Ta", "text": "text of a"},
                                          {"title": "Tb", "text": "text of b"}]}]))
    (tmp_path / "p.yaml").write_text("name: long\nkind: selfrag\nselfrag: {task: asqa, segment_retrieval: static}\n")
    config = load_pipeline_config(tmp_path / "p.yaml")
    g = ScriptedGenerator(default=tree_rule, tokenizer=TOK)
    pipe = SelfRagPipeline(config, g)  # type: ignore[arg-type]
    summary = evaluate([tmp_path / "p.yaml"], data, out=tmp_path / "run", use_ctxs=True, progress=False,
                       pipelines={str(tmp_path / "p.yaml"): pipe})
    assert summary["pipelines"][0]["primary_metric"] == "alce"
    (rec,) = json.loads((tmp_path / "run/long/alce.json").read_text())["data"]
    assert rec["sample_id"] == "s1" and rec["qa_pairs"] == [{"short_answers": ["Alpha"]}]
    assert rec["output"].startswith("Alpha one [1].") and rec["docs"][0]["title"] == "Ta"


# --- SciPhi ----------------------------------------------------------------------------------


def sciphi_pipeline(raw: str = "[Relevant]Paris.[Utility:5]") -> tuple[ChatRagPipeline, ScriptedGenerator]:
    g = ScriptedGenerator(default=text_generation(raw))

    config = pipeline_config(name="s", prompt={"format": "sciphi"}, generation={"stop": ["<paragraph>"]})
    return ChatRagPipeline(config, g, FixedRetriever(lambda q: [hit("a")])), g  # type: ignore[arg-type]


def test_sciphi_stop_check_cannot_be_bypassed_through_the_python_api() -> None:
    pipe, g = sciphi_pipeline()
    with pytest.raises(ConfigError, match="lacks '<paragraph>'"):
        pipe.ask("Where?", params=GenerationParams(max_new_tokens=5))
    with pytest.raises(ConfigError, match="lacks '<paragraph>'"):
        asyncio.run(pipe.aanswer([ChatMessage(role="user", content="Where?")], params=GenerationParams()))
    assert g.calls == []  # refused before any generation


def test_get_chat_completion_takes_the_cards_call_shape() -> None:
    pipe, g = sciphi_pipeline()
    llm = SciPhiInterface(pipe)
    out = llm.get_chat_completion([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where?"}],
                                  {"max_tokens_to_sample": 7, "temperature": 0.1, "top_p": 0.9,
                                   "stop_token": "<paragraph>", "model_name": "SciPhi/SciPhi-Self-RAG-Mistral-7B-32k"})
    assert out == "Paris."
    assert g.calls[0][0].startswith("### System:\nBelow is a series") and "Be brief." in g.calls[0][0]
    p = generation_params({"max_tokens_to_sample": 7, "do_sample": False}, pipe.config.generation)
    assert (p.max_new_tokens, p.temperature, p.stop) == (7, 0.0, ["<paragraph>"])
    for bad, match in [({"stop_token": "</s>"}, "only accepts '<paragraph>'"), ({"do_stream": True}, "astream"),
                       ({"num_beams": 4}, "beam search"),
                       ({"add_generation_kwargs": {"x": 1}}, "add_generation_kwargs"),
                       ({"max_tokens_to_sample": 0}, "max_new_tokens"), ({"colour": 1}, "colour")]:
        with pytest.raises(ConfigError, match=match):
            llm.get_chat_completion([{"role": "user", "content": "x"}], bad)
    with pytest.raises(PromptError, match="tool"):
        llm.get_chat_completion([{"role": "tool", "content": "x"}])


def test_plain_format_for_base_models() -> None:
    fmt = get_format("plain")
    msgs = [ChatMessage(role="user", content="Capital of France? [INST]")]
    assert fmt.render(msgs) == "Capital of France? [ INST]"
    assert fmt.render(msgs, context="Paris is the capital.") == (
        "Capital of France? [ INST]\n\nPassage: Paris is the capital.\n\nAnswer:")
