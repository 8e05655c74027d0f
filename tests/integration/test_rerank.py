"""Rerankers on real parts: a cross-encoder (a tiny random BERT built and saved here) through
sentence-transformers' `CrossEncoder`, in a pipeline, behind ``rag serve``'s ``/v1/rerank``, and
the remote reranker client against that real server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rag.config import pipeline_config
from rag.embedding import passage_text
from rag.pipeline import ChatRagPipeline, RetrievalPipeline
from rag.rerank import CrossEncoderReranker, LLMReranker, RemoteReranker, rerank_hits
from rag.retriever import fuse
from rag.server import create_app
from rag.types import ChatMessage, GenerationParams, Passage
from tests.integration.servers import running
from tests.unit.conftest import memory_retriever

pytestmark = pytest.mark.integration

PASSAGES = [Passage(id=f"p{i}", title=t, text=x) for i, (t, x) in enumerate([
    ("Nile", "The Nile is a long river in Africa."), ("Amazon", "The Amazon river flows through Brazil."),
    ("Paris", "Paris is the capital of France."), ("Danube", "The Danube flows through Vienna."),
    ("Tea", "Tea grows in Assam."), ("Rhine", "The Rhine river flows through Germany.")])]
QUERY = "which river flows through africa"


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT cross-encoder (one label) with a word-level vocabulary, saved."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder = tmp_path_factory.mktemp("cross-encoder")
    words = sorted({w.strip(".,").lower() for p in PASSAGES for w in f"{p.title} {p.text} {QUERY}".split()})
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=1,
                                                     initializer_range=0.5))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_scores_equal_cross_encoder_predict_and_the_order_is_applied(cross_encoder: Path) -> None:
    from sentence_transformers import CrossEncoder

    want = CrossEncoder(str(cross_encoder)).predict([(QUERY, passage_text(p.title, p.text)) for p in PASSAGES])
    reranker = CrossEncoderReranker(str(cross_encoder))
    assert reranker.score(QUERY, PASSAGES) == pytest.approx([float(x) for x in want], abs=1e-6)
    assert len(set(reranker.score(QUERY, PASSAGES))) >= 4  # a real ordering to check (ties keep the first stage's)

    retriever = memory_retriever(PASSAGES)
    pipe = RetrievalPipeline(pipeline_config(name="r", kind="retrieval", retrieval={
        "top_k": 3, "rerank": {"model": str(cross_encoder), "candidates": 6}}), retriever)
    (answer,) = pipe.answer_batch([[ChatMessage(role="user", content=QUERY)]])
    first = retriever.search(QUERY, 6)
    scores = reranker.score(QUERY, [h.passage for h in first])
    order = sorted(range(6), key=lambda i: -scores[i])[:3]
    assert [h.passage.id for h in answer.hits] == [first[i].passage.id for i in order]
    assert order != [0, 1, 2]  # the reranker changed the first stage's order
    assert [h.score for h in answer.hits] == pytest.approx([scores[i] for i in order])


def test_weight_fuses_reranked_and_first_stage_rankings(cross_encoder: Path) -> None:
    retriever = memory_retriever(PASSAGES)
    first = retriever.search(QUERY, 6)
    scores = CrossEncoderReranker(str(cross_encoder)).score(QUERY, [h.passage for h in first])
    got = rerank_hits(first, scores, 4, weight=0.7)
    reranked = rerank_hits(first, scores, 6)
    want = fuse(reranked, first, method="rrf", dense_weight=0.7)[:4]
    assert [(h.passage.id, h.score) for h in got] == [(pid, pytest.approx(s)) for pid, s in want]


@pytest.fixture(scope="module")
def rerank_server(cross_encoder: Path) -> Iterator[str]:
    pipe = RetrievalPipeline(pipeline_config(name="ranker", kind="retrieval", retrieval={
        "top_k": 3, "rerank": {"model": str(cross_encoder)}}), memory_retriever(PASSAGES))
    with running(create_app(pipe)) as base:
        yield base


def test_rerank_endpoint_in_cohere_shape(rerank_server: str, cross_encoder: Path) -> None:
    docs = [p.text for p in PASSAGES]
    r = httpx.post(rerank_server + "/v1/rerank", json={"model": "ranker", "query": QUERY, "documents": docs,
                                                       "top_n": 4}).json()
    scores = CrossEncoderReranker(str(cross_encoder)).score(QUERY, [Passage(id="x", title="", text=d) for d in docs])
    want = sorted(range(len(docs)), key=lambda i: -scores[i])[:4]
    assert [x["index"] for x in r["results"]] == want
    assert [x["relevance_score"] for x in r["results"]] == pytest.approx([scores[i] for i in want])
    assert r["results"][0]["document"] == {"text": docs[want[0]]}
    bad = httpx.post(rerank_server + "/v1/rerank", json={"model": "ranker", "query": QUERY, "documents": []})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "documents"


def test_remote_reranker_against_rag_serve_equals_the_local_one(rerank_server: str, cross_encoder: Path) -> None:
    remote = RemoteReranker("ranker", base_url=rerank_server + "/v1")
    local = CrossEncoderReranker(str(cross_encoder))
    # the server sees title + text as one document, as the local reranker builds it
    assert remote.score(QUERY, PASSAGES) == pytest.approx(local.score(QUERY, PASSAGES), abs=1e-6)
    remote.close()


def _raw_query_loglikelihood(generator: Any, query: str, passage: Passage) -> float:
    """log p(query | passage) straight from a transformers forward pass over the same prompt."""
    import torch

    from rag.prompts import get_format
    from rag.selfrag.critic import QL_Q

    fmt = get_format("hf_template", generator=generator)
    head = fmt.render([ChatMessage(role="user", content=QL_Q.format(passage=passage.title_text))])
    ids = generator.encode(head + query)
    n = len(ids) - len(generator.encode(head))
    with torch.inference_mode():
        logits = generator.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return float(sum(logits[i - 1, ids[i]] for i in range(len(ids) - n, len(ids))))


@pytest.mark.slow
def test_llm_reranker_is_the_query_likelihood_on_both_backends(hf_smollm: Any, vllm_smollm: Any) -> None:
    passages = PASSAGES[:4]
    hf = LLMReranker(hf_smollm).score(QUERY, passages)
    assert hf == pytest.approx([_raw_query_loglikelihood(hf_smollm, QUERY, p) for p in passages], abs=1e-3)
    assert LLMReranker(vllm_smollm).score(QUERY, passages) == pytest.approx(hf, abs=2e-3)

    retriever = memory_retriever(PASSAGES)
    pipe = ChatRagPipeline(pipeline_config(name="q", prompt={"format": "hf_template"}, retrieval={
        "top_k": 2, "rerank": {"method": "llm", "model": "generator", "candidates": 4}}), hf_smollm, retriever)
    (answer,) = pipe.answer_batch([[ChatMessage(role="user", content=QUERY)]],
                                  params=GenerationParams(max_new_tokens=2))
    first = retriever.search(QUERY, 4)
    scores = LLMReranker(hf_smollm).score(QUERY, [h.passage for h in first])
    order = sorted(range(4), key=lambda i: -scores[i])[:2]
    assert [h.passage.id for h in answer.hits] == [first[i].passage.id for i in order]


def test_tune_query_chooses_rerank_settings_that_the_pipeline_then_runs(cross_encoder: Path, tmp_path: Path) -> None:
    import asyncio
    import json

    from rag.eval.datasets import load_dataset
    from rag.eval.fusion import _score, split
    from rag.eval.query import CANDIDATES, RERANK_WEIGHTS, tune_query

    rivers = [p for p in PASSAGES if "river" in p.text or "flows" in p.text]
    (tmp_path / "conversations.jsonl").write_text("".join(json.dumps({
        "id": f"t{i}", "gold_passages": [p.id], "messages": [
            {"role": "user", "content": "rivers please"}, {"role": "assistant", "content": "Which one?"},
            {"role": "user", "content": f"the one in {p.title} {'flows' if i % 2 else 'river'}"}]}) + "\n"
        for i, p in enumerate(rivers * 2)))
    items = load_dataset(tmp_path)
    retrieval = {"top_k": 6, "rerank": {"model": str(cross_encoder), "candidates": 6}}
    pipe = RetrievalPipeline(pipeline_config(name="r", kind="retrieval", retrieval=retrieval),
                             memory_retriever(PASSAGES))
    result = tune_query(items, pipe, held_out=0.5, seed=2, depth=6)
    assert len(result["rerank_grid"]) == 1 + len(CANDIDATES) * len(RERANK_WEIGHTS)
    chosen_row = next(g for g in result["rerank_grid"] if g["rerank"] == result["rerank"])
    best = max(g["gain_bound"] for g in result["rerank_grid"])
    assert result["rerank_gain_bound"] == chosen_row["gain_bound"] == best
    assert result["tune_score"] == chosen_row["score"] and result["rerank_grid"][0]["gain_bound"] == 0.0  # no rerank
    tune_items, held = split(items, 0.5, 2)

    def run(settings: dict[str, Any], group: list[Any]) -> float:  # the pipeline with these settings
        chosen = RetrievalPipeline(pipeline_config(name="c", kind="retrieval", retrieval={
            **retrieval, **result["query"], **settings}), memory_retriever(PASSAGES))
        hits, _ = asyncio.run(chosen.conversation_hits([it.messages or [] for it in group], 6))
        return _score(group, {it.id: [(h.passage.id, -n) for n, h in enumerate(hs)]
                              for it, hs in zip(group, hits, strict=True)}, "ndcg@10")

    # tuning measures what serving runs: each grid point's tuning score, and the choice's held-out score
    for g in result["rerank_grid"]:
        rerank = None if g["rerank"] is None else {**retrieval["rerank"], **g["rerank"]}
        assert g["score"] == pytest.approx(run({"rerank": rerank}, tune_items)), g
    assert len({round(g["score"], 6) for g in result["rerank_grid"]}) > 1  # the reranker changed rankings
    chosen = None if result["rerank"] is None else {**retrieval["rerank"], **result["rerank"]}
    assert result["held_out"]["tuned"] == pytest.approx(run({"rerank": chosen}, held))


@pytest.mark.slow
def test_rewrite_and_hyde_on_smollm2_both_backends(hf_smollm: Any, vllm_smollm: Any) -> None:
    """The packaged SmolLM2 writes the rewrite and the HyDE passage (greedy, so both backends write
    the same text), and the pipeline searches exactly what it wrote."""
    import asyncio


    convo = [ChatMessage(role="user", content="Tell me about the Nile"),
             ChatMessage(role="assistant", content="The Nile is a long river in Africa."),
             ChatMessage(role="user", content="and which river flows through Brazil?")]
    retriever = memory_retriever(PASSAGES)
    written: dict[str, list[str]] = {"rewrite": [], "hyde": []}
    for gen in (hf_smollm, vllm_smollm):
        for query in ("rewrite", "hyde"):
            pipe = ChatRagPipeline(pipeline_config(name="q", prompt={"format": "hf_template"}, retrieval={
                "top_k": 3, "query": query, "hyde_weight": 0.5}), gen, retriever)
            text = asyncio.run(pipe.rewrite(convo, passage=query == "hyde"))
            (answer,) = pipe.answer_batch([convo], params=GenerationParams(max_new_tokens=2))
            last = convo[-1].content
            if query == "rewrite":
                assert answer.trace.query == text and text.strip() and "\n" not in text
                want = [(h.passage.id, h.score) for h in retriever.search(text, 3)]
            else:
                assert answer.trace.query == f"{last} || {text}" and len(text.split()) >= 5
                want = fuse(retriever.search(last, 20), retriever.search(text, 20), method="rrf",
                            dense_weight=0.5)[:3]
            assert [(h.passage.id, h.score) for h in answer.hits] == [(p, pytest.approx(s)) for p, s in want]
            written[query].append(text)
    assert written["rewrite"][0] == written["rewrite"][1] and written["hyde"][0] == written["hyde"][1]
