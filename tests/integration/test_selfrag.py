"""Self-RAG end to end on real models: the tiny reflection-token Llama through both backends,
and the prompted critic on the packaged SmolLM2."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from rag.config import IndexRecipe, SelfRagSettings
from rag.index import build_index
from rag.selfrag.critic import PromptedCritic, TokenCritic
from rag.selfrag.decoder import SelfRagDecoder
from rag.types import GenerationParams, Hit, Passage
from tests.conftest import SHARED_DATA, run_cli

pytestmark = pytest.mark.integration

PASSAGES = [Passage(id=str(i), title=t, text=x) for i, (t, x) in enumerate([
    ("Hamlet", "Hamlet is a tragedy written by William Shakespeare around 1600."),
    ("Water", "Water boils at 100 degrees Celsius at sea level."),
    ("Everest", "Mount Everest is the highest mountain above sea level."),
])]


async def search(queries: Sequence[str], k: int) -> list[list[Hit]]:
    return [[Hit(passage=p, score=1.0 - i / 10, rank=i + 1) for i, p in enumerate(PASSAGES[:k])]
            for _ in queries]


def run_decoder(gen: Any, settings: SelfRagSettings) -> list[Any]:
    dec = SelfRagDecoder(gen, TokenCritic(gen), settings, GenerationParams(max_new_tokens=24))
    if settings.decoding == "long":
        return [asyncio.run(dec.long_form("Who wrote Hamlet?", search, 3))]
    return asyncio.run(dec.short_form(["Who wrote Hamlet?", "When does water boil?"], search, 3))


@pytest.mark.parametrize("settings", [
    SelfRagSettings(mode="always"),
    SelfRagSettings(mode="adaptive", threshold=0.0),
    SelfRagSettings(mode="always", decoding="long", max_depth=2, beam_width=2, segment_retrieval="static"),
], ids=["short-always", "short-adaptive", "long"])
def test_tiny_selfrag_model_same_scores_on_both_backends(hf_tiny: Any, vllm_tiny: Any,
                                                         settings: SelfRagSettings) -> None:
    assert_same_answers(run_decoder(hf_tiny, settings), run_decoder(vllm_tiny, settings), settings)


@pytest.mark.slow
@pytest.mark.parametrize("settings", [
    SelfRagSettings(mode="adaptive", threshold=0.0),
    SelfRagSettings(mode="always", decoding="long", max_depth=2, beam_width=2, segment_retrieval="static"),
], ids=["short-adaptive", "long"])
@pytest.mark.parametrize("local,remote", [("vllm_tiny", "remote_tiny_vllm"), ("hf_tiny", "remote_tiny_rag")],
                         ids=["over-vllm-serve", "over-rag-serve"])
def test_tiny_selfrag_model_over_a_server_same_scores_as_in_process(
        local: str, remote: str, settings: SelfRagSettings, request: pytest.FixtureRequest) -> None:
    """Backend openai: the whole decoder (adaptive retrieval, tree search) over a real server
    scores as the same engine does in-process (exact logprobs through logprob_token_ids)."""
    a = run_decoder(request.getfixturevalue(local), settings)
    b = run_decoder(request.getfixturevalue(remote), settings)
    assert_same_answers(a, b, settings)


def assert_same_answers(a: list[Any], b: list[Any], settings: SelfRagSettings) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.text == y.text
        assert x.retrieval.decision == y.retrieval.decision
        if x.retrieval.probability is not None:
            assert x.retrieval.probability == pytest.approx(y.retrieval.probability, abs=1e-4)
        assert len(x.scores) == len(y.scores) > 0
        for sx, sy in zip(x.scores, y.scores):
            assert sx.passage_id == sy.passage_id
            for field in ("s_rel", "s_sup", "s_use", "seq", "total"):
                assert getattr(sx, field) == pytest.approx(getattr(sy, field), abs=1e-3), field
            assert 0.0 <= sx.s_rel <= 1.0 and -1.0 <= sx.s_use <= 1.0
    if settings.decoding == "long":
        assert a[0].trace.tree and all("[" in c for c in a[0].text.split() if c.startswith("["))
        for m, n in zip(a[0].trace.tree, b[0].trace.tree, strict=True):
            assert (m.passage_id, m.segment, m.done) == (n.passage_id, n.segment, n.done)
            assert (m.score is None) == (n.score is None) and (m.score or 0) == pytest.approx(n.score or 0, abs=1e-3)


def squad_pairs(n: int) -> list[tuple[str, Passage, Passage]]:
    data = json.loads((SHARED_DATA / "squad-v1.1-dev/dev-v1.1.json").read_text())
    paras = [(a["title"], p) for a in data["data"] for p in a["paragraphs"][:1]]
    out = []
    for i in range(n):
        title, para = paras[i * 3]
        other_title, other = paras[i * 3 + 25]
        out.append((para["qas"][0]["question"],
                    Passage(id="gold", title=title.replace("_", " "), text=para["context"]),
                    Passage(id="other", title=other_title.replace("_", " "), text=other["context"])))
    return out


def test_prompted_critic_prefers_the_relevant_passage(hf_smollm: Any, shared_data: Path) -> None:
    critic = PromptedCritic(hf_smollm)
    pairs = squad_pairs(8)
    scores = asyncio.run(critic.relevance([(q, p) for q, gold, other in pairs for p in (gold, other)]))
    rel = [(scores[2 * i], scores[2 * i + 1]) for i in range(len(pairs))]
    wins = sum(g > o for g, o in rel)
    assert wins >= 6, rel  # the passage with the answer wins on at least 6 of 8 questions
    assert sum(g for g, _ in rel) > sum(o for _, o in rel)


def test_rag_ask_selfrag_critic_json_prints_scores(tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n"
                              for p in PASSAGES))
    build_index(IndexRecipe(name="c", corpus=str(corpus), out=str(tmp_path / "idx")), progress=False)
    r = run_cli("ask", "--pipeline", "pipelines/selfrag-critic.yaml", "--index", str(tmp_path / "idx"),
                "Who wrote Hamlet?", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["scores"]) == 3
    assert {"s_rel", "s_sup", "s_use", "seq", "total", "passage_id"} <= set(out["scores"][0])
    assert out["retrieval"]["critic"] == "prompted"
    best = max(out["scores"], key=lambda s: s["total"])
    assert out["citations"][0]["id"] == best["passage_id"]
    assert out["answer"] == best["text"] and out["answer"]
