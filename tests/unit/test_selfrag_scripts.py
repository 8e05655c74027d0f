"""Where `rag` must do what the Self-RAG reference scripts do (AkariAsai/self-rag at 1fcdc42;
``run_short_form.py`` at 9d9cd1c), what ALCE's ``eval.py`` and FActScore's ``factscorer.py``
read, and the SciPhi card's ``GenerationConfig``. Each expectation is computed here the way the
script computes it, not read off `rag`."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

from rag.config import SelfRagSettings, load_pipeline_config
from rag.eval.datasets import detect_format, load_dataset
from rag.eval.metrics import match
from rag.eval.runner import evaluate, score_item
from rag.generation.scripted import ScriptedGenerator
from rag.pipeline import SelfRagPipeline
from rag.sciphi import generation_params
from rag.selfrag.critic import TokenCritic
from rag.selfrag.decoder import SelfRagDecoder
from rag.types import Answer, GenerationParams
from tests.unit.test_selfrag import PROMPT, TOK, decoder, gen, hit, long_form, short_form, tree_rule

ROOT = Path(__file__).resolve().parents[2]


# --- 1. the short-form compat recipe scores as run_short_form.py with the README's flags ---------


def script_final_score(rel: dict[str, float], sup: dict[str, float], use: dict[str, float], seq: float) -> float:
    """``run_short_form.py`` (9d9cd1c) ``call_model_rerank_w_scores_batch`` with --use_groundness
    --use_utility --use_seqscore and main()'s w_rel=1, w_sup=1, w_use=0.5; absent ids are -100."""
    def p(d: dict[str, float], k: str) -> float:
        return math.exp(math.log(d[k])) if k in d else math.exp(-100)

    rel_p = {k: p(rel, k) for k in ("[Irrelevant]", "[Relevant]")}
    relevance = rel_p["[Relevant]"] / sum(rel_p.values())
    grd = {k: p(sup, k) for k in ("[Fully supported]", "[Partially supported]", "[No support / Contradictory]")}
    ground = grd["[Fully supported]"] / sum(grd.values()) + 0.5 * grd["[Partially supported]"] / sum(grd.values())
    ut = [p(use, f"[Utility:{i}]") for i in range(1, 6)]
    utility = sum(w * x / sum(ut) for w, x in zip([-1, -0.5, 0, 0.5, 1], ut, strict=True))
    return math.exp(seq) + 1.0 * relevance + 1.0 * ground + 0.5 * utility


def test_short_compat_recipe_reproduces_the_scripts_scores_and_choice() -> None:
    settings = load_pipeline_config(ROOT / "pipelines/selfrag-short-compat.yaml").selfrag
    settings = settings.model_copy(update={"mode": "always"})  # the decision has tests of its own
    # b is judged a little better; a is far more fluent: the sequence score decides
    spec = {"a": (0.80, "Paris", {"[Fully supported]": 0.7, "[Partially supported]": 0.2,
                                  "[No support / Contradictory]": 0.1}, 4, -0.05),
            "b": (0.85, "Lyon", {"[Fully supported]": 0.75, "[Partially supported]": 0.2,
                                 "[No support / Contradictory]": 0.05}, 5, -2.5)}
    cands, expected = {}, {}
    for k, (rel, text, sup, use, lp) in spec.items():
        rel_d = {"[Relevant]": rel, "[Irrelevant]": 1 - rel}
        use_d = {f"[Utility:{use}]": 0.9}
        cands[k] = gen(["[Relevant]", text, "[Fully supported]", f"[Utility:{use}]"], [rel_d, {}, sup, use_d],
                       token_lp=lp)
        expected[k] = script_final_score(rel_d, sup, use_d, lp)  # seq = cumulative_logprob / n tokens
    script = [(lambda p, k=k: f"text of {k}" in p, g) for k, g in cands.items()]
    dec, _ = decoder(script, settings)
    (answer,) = short_form(dec, ["Where?"], lambda qs, k: [[hit("a"), hit("b")]], 2)
    got = {s.passage_id: s.total for s in answer.scores}
    assert got == pytest.approx(expected, abs=1e-12)
    assert max(expected, key=lambda k: expected[k]) == "a" and answer.text == "Paris"
    assert expected["b"] - math.exp(-2.5) > expected["a"] - math.exp(-0.05)  # without the sequence score: b


# --- 2 and 9. long-form output as run_long_form_static.py writes it -----------------------------


def one_segment_answer(pieces: list[str]) -> str:
    g = ScriptedGenerator(default=gen(pieces), tokenizer=TOK)
    s = SelfRagSettings(mode="always", decoding="long", beam_width=1, max_depth=1, segment_retrieval="static")
    dec = SelfRagDecoder(g, TokenCritic(g), s, GenerationParams(max_new_tokens=50))
    return long_form(dec, "Who was Alpha?", lambda qs, k: [[hit("a")] for _ in qs], 1).text


def test_continue_to_use_evidence_is_a_citation_point_and_spacing_is_fixed() -> None:
    out = one_segment_answer(["[Relevant]", "Alpha was born in 1900.", "[Fully supported]",
                              "[Continue to Use Evidence]", "Alpha died in 1950."])
    assert out == "Alpha was born in 1900 [1]. Alpha died in 1950 [1]."  # two cited sentences
    assert one_segment_answer(["[Relevant]", "Alpha was born in 1900.Alpha died in 1950."]) == \
        "Alpha was born in 1900. Alpha died in 1950 [1]."  # utils.fix_spacing
    assert one_segment_answer(["[Relevant]", "Alpha grew 3.5 cm."]) == "Alpha grew 3.5 cm [1]."  # not in numbers


def test_long_form_without_retrieval_keeps_the_text_before_the_first_blank_line() -> None:
    g = ScriptedGenerator(default=gen(["Alpha was a painter.\n\nQuestion: who else?"]), tokenizer=TOK)
    s = SelfRagSettings(mode="never", decoding="long")
    dec = SelfRagDecoder(g, TokenCritic(g), s, GenerationParams(max_new_tokens=50))
    assert long_form(dec, "Who was Alpha?", lambda qs, k: [], 1).text == "Alpha was a painter."


# --- 5. the segment ends at the first retrieval point ---------------------------------------------


def test_a_remapped_no_retrieval_before_a_generated_retrieval_cuts_the_segment_there() -> None:
    def rule(prompt: str) -> Any:
        if prompt.count("<paragraph>") >= 2:
            return gen(["[Relevant]", "Third."])
        # [No Retrieval] where p(Retrieval)+p(Continue) over p(Retrieval)+p(No Retrieval) = 0.67 > 0.2
        return gen(["[Relevant]", "First.", "[No Retrieval]", "Second."],
                   [{"[Relevant]": 0.9, "[Irrelevant]": 0.1}, {},
                    {"[Retrieval]": 0.5, "[No Retrieval]": 0.4, "[Continue to Use Evidence]": 0.1}],
                   stop_at_retrieval=True)

    g = ScriptedGenerator(default=rule, tokenizer=TOK)
    s = SelfRagSettings(mode="always", decoding="long", beam_width=1, max_depth=2, segment_retrieval="static",
                        threshold=0.2)
    dec = SelfRagDecoder(g, TokenCritic(g), s, GenerationParams(max_new_tokens=50))
    long_form(dec, "Q", lambda qs, k: [[hit("a")] for _ in qs], 1)
    (depth2,) = g.calls[1]
    assert depth2 == (PROMPT.replace("Where is the Eiffel Tower?", "Q")
                      + "[Retrieval]<paragraph>Ta\ntext of a</paragraph>[Relevant]First."
                      + "[Retrieval]<paragraph>Ta\ntext of a</paragraph>")


# --- 6. a task preset never undoes what the pipeline file sets ------------------------------------


def test_task_on_the_command_line_keeps_the_compat_recipes_own_settings() -> None:
    c = load_pipeline_config(ROOT / "pipelines/selfrag-long-compat.yaml", task="asqa")
    assert c.selfrag.max_depth == 6 and c.selfrag.mode == "always"  # the recipe's, not the preset's 7
    assert c.generation.max_new_tokens == 300 and c.retrieval.top_k == 5  # the preset fills the rest


# --- 8. closed tasks answer with the voted label ---------------------------------------------------


def test_closed_task_answer_is_the_normalised_winner_pubhealth_scores_it() -> None:
    cands = {"a": gen(["[Relevant]", "false", "[Fully supported]"], [{"[Relevant]": 0.7, "[Irrelevant]": 0.3}]),
             "b": gen(["[Relevant]", "True", "[Fully supported]"], [{"[Relevant]": 0.6, "[Irrelevant]": 0.4}]),
             "c": gen(["[Relevant]", "True.", "[Fully supported]"], [{"[Relevant]": 0.6, "[Irrelevant]": 0.4}])}
    script = [(lambda p, k=k: f"text of {k}" in p, g) for k, g in cands.items()]
    dec, _ = decoder(script, SelfRagSettings(mode="always", task="pubhealth"))
    (answer,) = short_form(dec, ["Claim?"], lambda qs, k: [[hit("a"), hit("b"), hit("c")]], 3)
    assert answer.text == "true" and match(answer.text, ["true"]) == 1.0  # the script's case-sensitive match


# --- 4. ARC-Challenge: the script's prompt layout, and its metrics ----------------------------------


def script_arc_prompt(o: dict[str, Any]) -> str:
    """``run_short_form.py`` ``preprocess_input_data`` for arc_c: labels A-D (or 1-4) only, an
    empty D line when there is none, E dropped."""
    labels: dict[str, str] = {}
    for key, text in zip(o["choices"]["label"], o["choices"]["text"], strict=True):
        if key in ("1", "2", "3", "4"):
            labels["ABCD"[int(key) - 1]] = text
        if key in ("A", "B", "C", "D"):
            labels[key] = text
    labels.setdefault("D", "")
    return o["question"] + "\nA: {}\nB: {}\nC: {}\nD: {}".format(*(labels[k] for k in "ABCD"))


def test_arc_reference_layout_reproduces_every_script_prompt(shared_data: Path) -> None:
    path = shared_data / "arc-challenge/ARC-Challenge-Test.jsonl"
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    items = load_dataset(path, "arc")
    assert len(items) == len(raw) == 1172
    assert all(it.prompt_text("reference") == script_arc_prompt(o) for it, o in zip(items, raw, strict=True))
    differ = [it.id for it, o in zip(items, raw, strict=True) if it.prompt_text() != script_arc_prompt(o)]
    assert len(differ) == 7  # 4 questions with 3 options, 3 with 5: the layout only the recipe reproduces
    assert load_pipeline_config(ROOT / "pipelines/selfrag-short-compat.yaml").selfrag.choice_layout == "reference"


def test_multiple_choice_scores_accuracy_and_the_scripts_match_never_a_one_letter_substring(tmp_path: Path) -> None:
    data = tmp_path / "arc.jsonl"
    data.write_text(json.dumps({"id": "q1", "question": "What is strongest?", "answerKey": "B",
                                "choices": {"label": ["A", "B", "C"], "text": ["paper", "steel", "buildings"]}}) + "\n")
    (item,) = load_dataset(data, "arc")
    wrong = score_item(item, Answer(text="C: buildings"))
    assert wrong == {"accuracy": 0.0, "match": 0.0}  # no match_norm: gold "B" normalises to "b", in "buildings"
    right = score_item(item, Answer(text="B"))
    assert right == {"accuracy": 1.0, "match": 1.0}
    assert score_item(item, Answer(text="The answer is steel"))["match"] == 0.0  # match reads answerKey alone


# --- 3. FActScore reads what rag eval writes ------------------------------------------------------


def factscorer_read(path: Path) -> tuple[list[str], list[str]]:
    """What ``factscorer.py`` does with --input_path: one JSON object per line, ``topic`` and
    ``output``."""
    topics, generations = [], []
    with open(path) as f:
        for line in f:
            dp = json.loads(line)
            topics.append(dp["topic"])
            generations.append(dp["output"])
    return topics, generations


def test_factscore_task_writes_the_file_factscore_reads_and_its_input_is_detected(tmp_path: Path) -> None:
    data = tmp_path / "bio.jsonl"
    data.write_text(json.dumps({"input": "Question: Tell me a bio of Alpha.", "topic": "Alpha", "output": "",
                                "ctxs": [{"title": "Ta", "text": "text of a"}, {"title": "Tb", "text": "text of b"}]})
                    + "\n")
    assert detect_format(data) == "factscore"
    (item,) = load_dataset(data)
    assert item.question == "Question: Tell me a bio of Alpha." and item.extra["topic"] == "Alpha"
    (tmp_path / "p.yaml").write_text("name: bio\nkind: selfrag\n"
                                     "selfrag: {task: factscore, mode: always, segment_retrieval: static}\n")
    g = ScriptedGenerator(default=tree_rule, tokenizer=TOK)
    pipe = SelfRagPipeline(load_pipeline_config(tmp_path / "p.yaml"), g)  # type: ignore[arg-type]
    evaluate([tmp_path / "p.yaml"], data, out=tmp_path / "run", use_ctxs=True, progress=False,
             pipelines={str(tmp_path / "p.yaml"): pipe})
    topics, outputs = factscorer_read(tmp_path / "run/bio/factscore.jsonl")
    assert topics == ["Alpha"] and outputs == ["Alpha one. Alpha two."]  # no [i] citation markers


# --- 7. SciPhiInterface takes sciphi's GenerationConfig as it is ---------------------------------


@dataclasses.dataclass
class SciPhiGenerationConfig:
    """The fields and defaults of sciphi's ``GenerationConfig`` (sciphi/llm/base.py)."""

    temperature: float = 0.1
    top_p: float = 1.0
    top_k: int = 100
    max_tokens_to_sample: int = 1_024
    model_name: str | None = None
    skip_special_tokens: bool = False
    stop_token: str | None = None
    num_beams: int = 1
    do_sample: bool = True
    generate_with_chat: bool = False
    add_generation_kwargs: dict[str, Any] | None = dataclasses.field(default_factory=dict)
    api_base: str | None = None
    do_stream: bool = False
    functions: list[dict[str, Any]] | None = None


def test_sciphi_generation_config_object_is_accepted_and_mapped() -> None:
    base = GenerationParams(stop=["<paragraph>"])
    p = generation_params(SciPhiGenerationConfig(), base)
    assert (p.temperature, p.top_p, p.top_k, p.max_new_tokens) == (0.1, 1.0, 100, 1024)
    assert "<paragraph>" in p.stop
    greedy = generation_params(SciPhiGenerationConfig(temperature=0.0, top_k=0, max_tokens_to_sample=7), base)
    assert (greedy.temperature, greedy.top_k, greedy.max_new_tokens) == (0.0, 0, 7)
    with pytest.raises(Exception, match="add_generation_kwargs"):
        generation_params(SciPhiGenerationConfig(add_generation_kwargs={"repetition_penalty": 1.2}), base)
