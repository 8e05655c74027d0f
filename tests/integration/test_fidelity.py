"""The token stream the Self-RAG / SciPhi models were trained on (BOS once, on both backends, with
the real Mistral SentencePiece tokenizer), and `rag eval` with each paper task preset on slices
of the task files."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from rag.config import load_pipeline_config
from rag.eval.datasets import load_dataset
from rag.eval.runner import evaluate
from rag.pipeline import SelfRagPipeline
from rag.prompts import MistralInstFormat, SciPhiFormat, SelfRagFormat
from rag.selfrag.scoring import normalise_closed_answer
from rag.types import ChatMessage, GenerationParams

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TURN = [ChatMessage(role="user", content="Who wrote Hamlet?")]


def test_prompts_reach_both_backends_with_bos_exactly_once(hf_tiny: Any, vllm_tiny: Any, tiny_selfrag: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_selfrag)  # Mistral-7B's SentencePiece + the 15 tokens
    bos = tok.bos_token_id
    assert bos == 1 and tok.convert_tokens_to_ids("[No Retrieval]") == 32000  # as in selfrag_llama2_7b
    prompts = {"selfrag": SelfRagFormat().render(TURN, context="Hamlet\nHamlet is a tragedy by Shakespeare."),
               "sciphi": SciPhiFormat().render(TURN, context="Hamlet\nHamlet is a tragedy by Shakespeare."),
               "mistral_inst": MistralInstFormat().render(TURN)}
    assert not prompts["selfrag"].startswith("<s>") and prompts["mistral_inst"].startswith("<s>")
    for gen in (hf_tiny, vllm_tiny):
        for name, prompt in prompts.items():
            ids = gen.encode(prompt)
            assert ids[0] == bos and ids.count(bos) == 1, (type(gen).__name__, name)
            # what training's tokenizer(prompt) produced; a card that writes <s> itself is not doubled
            trained = tok(prompt, add_special_tokens=name != "mistral_inst")["input_ids"]
            assert ids == trained, (type(gen).__name__, name)
        (g,) = gen.generate([prompts["selfrag"]], GenerationParams(max_new_tokens=2))
        assert g.prompt_tokens == len(gen.encode(prompts["selfrag"]))  # the engine got exactly these ids


def _slice(tmp_path: Path, task: str, shared_data: Path, n: int = 3) -> Path:
    """``n`` questions of the task's file in the Self-RAG eval layout, with two ``ctxs`` each (the
    files here carry none; Self-RAG's own eval files do)."""
    if task == "arc_challenge":
        rows = [json.loads(x) for x in (shared_data / "arc-challenge/ARC-Challenge-Test.jsonl").open()][:n]
    elif task == "pubhealth":  # no PubHealth file here: claims in its layout (FEVER-style labels)
        rows = [{"question": "Vitamin C cures the common cold.", "answers": ["false"]},
                {"question": "Regular exercise lowers blood pressure.", "answers": ["true"]},
                {"question": "Smoking causes lung cancer.", "answers": ["true"]}][:n]
    else:
        name = "popqa_longtail.jsonl" if task == "popqa" else "triviaqa_test_1000.jsonl"
        rows = [json.loads(x) for x in (shared_data / "selfrag-eval-ctrla" / name).open()][:n]
    for r in rows:
        topic = r["question"].split("?")[0]
        r["ctxs"] = [{"id": "gold", "title": topic, "text": f"{topic}: " + " / ".join(r.get("answers", [])[:2])},
                     {"id": "other", "title": "Nile", "text": "The Nile is a long river in Africa."}]
    out = tmp_path / f"{task}.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.mark.parametrize("task,metric", [("popqa", "match"), ("triviaqa", "match"), ("pubhealth", "match"),
                                         ("arc_challenge", "accuracy")])
def test_rag_eval_task_preset_on_a_slice_with_the_prompted_critic(task: str, metric: str, vllm_smollm: Any,
                                                                  shared_data: Path, tmp_path: Path) -> None:
    data = _slice(tmp_path, task, shared_data)
    file = ROOT / "pipelines/selfrag-critic.yaml"
    config = load_pipeline_config(file, task=task)
    pipe = SelfRagPipeline(config, vllm_smollm)  # type: ignore[arg-type]
    summary = evaluate([file], data, out=tmp_path / "run", use_ctxs=True, progress=False, task=task,
                       pipelines={str(file): pipe})
    (p,) = summary["pipelines"]
    assert p["task"] == task and p["primary_metric"] == metric and p["n"] == 3
    records = [json.loads(x) for x in (tmp_path / "run/selfrag-critic/predictions.jsonl").open()]
    assert len(records) == 3 and all(r["prediction"] for r in records)
    if task == "arc_challenge":  # accuracy = the parsed choice (letter or option text) equals the key
        items = load_dataset(data)
        want = sum(normalise_closed_answer(r["prediction"], it.choices) == it.answer_key
                   for r, it in zip(records, items)) / 3
        assert p["metrics"]["accuracy"]["mean"] == pytest.approx(want)
    else:
        assert metric in p["metrics"]
    decided = [r["retrieval"]["decision"] for r in records]
    assert all(d in ("retrieve", "no_retrieval") for d in decided)
    if any(d == "retrieve" for d in decided):
        assert any(len(r["scores"]) == 2 for r in records)  # one candidate per ctx


def test_rag_eval_asqa_preset_writes_alce_records_on_the_reflection_token_model(vllm_tiny: Any, tmp_path: Path) -> None:
    data = tmp_path / "asqa.json"
    data.write_text(json.dumps({"data": [
        {"sample_id": f"s{i}", "question": q, "qa_pairs": [{"short_answers": [a]}],
         "docs": [{"title": "Hamlet", "text": "Hamlet is a tragedy by William Shakespeare."},
                  {"title": "Everest", "text": "Mount Everest is the highest mountain."}]}
        for i, (q, a) in enumerate([("Who wrote Hamlet?", "Shakespeare"),
                                    ("Which is the highest mountain?", "Everest")])]}))
    file = tmp_path / "long.yaml"
    file.write_text("name: long\nkind: selfrag\ngeneration: {max_new_tokens: 24}\n"
                    "selfrag: {task: asqa, max_depth: 2, segment_retrieval: static}\n")
    pipe = SelfRagPipeline(load_pipeline_config(file), vllm_tiny)
    summary = evaluate([file], data, out=tmp_path / "run", use_ctxs=True, progress=False,
                       pipelines={str(file): pipe})
    assert summary["pipelines"][0]["primary_metric"] == "alce"
    records = json.loads((tmp_path / "run/long/alce.json").read_text())["data"]
    assert [r["sample_id"] for r in records] == ["s0", "s1"] and records[0]["qa_pairs"]
    for r in records:
        cited = {int(n) for n in re.findall(r"\[(\d+)\]", r["output"])}
        assert cited <= set(range(1, len(r["docs"]) + 1))  # [i] is docs[i-1]
        assert not re.search(r"[.!?] \[\d+\]", r["output"])  # never after the sentence's end
