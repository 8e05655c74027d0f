"""The OpenAI contract on the packaged SmolLM2 (transformers) behind a real port, driven by the
official ``openai`` client: one request cannot stall or fail the others (stop lists, prompts
over the context, a poisoned batch, a client that hangs up, SIGTERM mid-step), chat logprobs,
embeddings equal to the index's query vectors, list prompts in one request, and a pipeline's
query strategy for follow-up turns as the endpoint runs it."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from rag.config import pipeline_config
from rag.generation.hf import TransformersGenerator
from rag.pipeline import ChatRagPipeline, RetrievalPipeline
from rag.retriever import DenseRetriever
from rag.server import create_app
from rag.types import GenerationParams
from tests.integration.conftest import rag_serve_model
from tests.integration.servers import passage_index, running

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONTEXT = 512
PASSAGES = [("z", "Zorblax Prize", "The Zorblax Prize is awarded every year in Kelmora to the best underwater "
             "violinist."), ("n", "Nile", "The Nile is a long river in Africa.")]


@pytest.fixture(scope="module")
def gen(smollm_path: Path) -> Iterator[TransformersGenerator]:
    g = TransformersGenerator(str(smollm_path), dtype="float32", max_model_len=CONTEXT).load()
    yield g
    g.close()


@pytest.fixture(scope="module")
def server(gen: TransformersGenerator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    index = passage_index(tmp_path_factory.mktemp("contract"), PASSAGES)
    chat = ChatRagPipeline(pipeline_config(name="chat", prompt={"format": "hf_template", "context_position": "user"},
                                           retrieval={"top_k": 1},
                                           generation={"max_new_tokens": 12}), gen, DenseRetriever.from_folder(index))
    search = RetrievalPipeline(pipeline_config(name="search", kind="retrieval"), DenseRetriever.from_folder(index))
    followup = ChatRagPipeline(pipeline_config(name="followup", prompt={"format": "hf_template"}, retrieval={
        "top_k": 2, "query": "history", "history_weight": 0.5}, generation={"max_new_tokens": 4}), gen,
        DenseRetriever.from_folder(index))
    app = create_app([chat, search, followup])
    with running(app) as base:
        yield base, app


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)


def complete(base: str, prompt: Any, **kw: Any) -> Any:
    return client(base).completions.create(model="chat", prompt=prompt, temperature=0, **kw)


def test_a_long_stop_list_is_honoured_and_capped(server: tuple[str, Any]) -> None:
    base, _ = server
    text = complete(base, "The river Nile flows through", max_tokens=12).choices[0].text
    word = text.split()[2]
    stops = [f"zq{i}xv" for i in range(15)] + [word]
    cut = complete(base, "The river Nile flows through", max_tokens=12, stop=stops).choices[0]
    assert cut.text == text[: text.index(word)] and cut.finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="at most 16"):
        complete(base, "x", stop=stops + ["one more"])


def test_prompts_over_the_context_are_400_naming_it(server: tuple[str, Any]) -> None:
    base, _ = server
    with pytest.raises(openai.BadRequestError, match=f"context of {CONTEXT} tokens"):
        complete(base, [100] * (CONTEXT - 4), max_tokens=8)
    with pytest.raises(openai.BadRequestError, match=f"context of {CONTEXT} tokens"):
        client(base).chat.completions.create(model="chat", messages=[{"role": "user", "content": "Nile " * 600}])


def test_a_bad_prompt_fails_alone_in_a_batch(server: tuple[str, Any], gen: TransformersGenerator) -> None:
    base, _ = server
    prompts = [f"Fact {i}: the Nile" for i in range(6)]
    solo = [g.text for g in gen.generate(prompts, GenerationParams(max_new_tokens=6))]

    def one(p: Any) -> Any:
        try:
            return complete(base, p, max_tokens=6).choices[0].text
        except openai.BadRequestError as e:
            return e

    with concurrent.futures.ThreadPoolExecutor(7) as pool:
        out = list(pool.map(one, [*prompts, [5, 999999, 7]]))
    assert out[:6] == solo
    assert isinstance(out[6], openai.BadRequestError) and "999999" in str(out[6])


def test_list_prompts_and_text_or_ids_in_one_request(server: tuple[str, Any], gen: TransformersGenerator) -> None:
    base, _ = server
    ids = gen.encode("The Nile is")
    r = complete(base, [ids, gen.encode("Hamlet was")], max_tokens=5)
    solo = gen.generate([ids, gen.encode("Hamlet was")], GenerationParams(max_new_tokens=5))
    assert [c.text for c in r.choices] == [g.text for g in solo] and [c.index for c in r.choices] == [0, 1]
    assert r.usage.prompt_tokens == len(ids) + len(gen.encode("Hamlet was"))


def test_a_json_client_that_hangs_up_frees_its_slot_and_the_worker(server: tuple[str, Any]) -> None:
    base, app = server
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + "/v1/completions", timeout=1.5,
                   json={"model": "chat", "prompt": "Count: 1 2 3", "max_tokens": 400, "min_tokens": 400})
    deadline = time.time() + 10
    while app.state.rag.admission.running and time.time() < deadline:
        time.sleep(0.1)
    assert not app.state.rag.admission.running
    t0 = time.time()
    complete(base, "Hi", max_tokens=2)  # the worker is not still busy with the 400 tokens
    assert time.time() - t0 < 10


def test_chat_logprobs_are_the_raw_completions_tokens(server: tuple[str, Any], gen: TransformersGenerator) -> None:
    base, _ = server
    r = client(base).chat.completions.create(model="chat", logprobs=True, top_logprobs=3, temperature=0,
                                             messages=[{"role": "user", "content": "Where is the Nile?"}],
                                             extra_body={"rag": {"include_trace": True}})
    content = r.choices[0].logprobs.content
    raw = r.model_extra["rag"]["trace"]["raw_completion"]
    assert "".join(t.token for t in content).startswith(raw) and len(content) == r.usage.completion_tokens
    for t in content:  # greedy: each token is its step's likeliest, and the top 3 come sorted
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-5)
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token or "\ufffd" in t.token
    with pytest.raises(openai.BadRequestError, match="only without stream"):
        client(base).chat.completions.create(model="chat", logprobs=True, stream=True,
                                             messages=[{"role": "user", "content": "x"}])


def test_embeddings_are_the_query_vectors_the_index_searches_with(server: tuple[str, Any]) -> None:
    base, app = server
    question = "Which prize goes to underwater violinists?"
    r = client(base).embeddings.create(model="search", input=[question, "the Nile"])  # base64 on the wire
    vectors = np.array([d.embedding for d in r.data], dtype=np.float32)
    retriever = app.state.rag.models["search"].pipeline.retriever
    np.testing.assert_allclose(vectors, retriever.embedder.encode_queries([question, "the Nile"]), atol=1e-6)
    by_vector = [h.passage.id for h in retriever.search_vectors(vectors[:1], 2)[0]]
    searched = httpx.post(base + "/v1/retrieve", json={"model": "search", "query": question, "top_k": 2}).json()
    assert by_vector == [h["id"] for h in searched["data"]] == ["z", "n"]


def test_sigterm_during_a_long_forward_step_stops_the_server_within_seconds(smollm_path: Path,
                                                                          tmp_path: Path) -> None:
    import psutil

    with rag_serve_model(smollm_path, tmp_path, "bare") as (base, proc):
        children = psutil.Process(proc.pid).children(recursive=True)
        body = {"model": "bare", "prompt": [(i * 7919) % 40000 + 100 for i in range(4000)], "max_tokens": 1}
        pending = concurrent.futures.ThreadPoolExecutor(1).submit(
            httpx.post, base + "/v1/completions", json=body, timeout=120,
            headers={"Authorization": "Bearer remote-sekret"})
        time.sleep(2.0)  # the 4,000-token prefill (~20 s on two cores) is running
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(12)
        except subprocess.TimeoutExpired:
            pytest.fail("rag serve still running 12 s after SIGTERM during a long forward step")
        print(f"exited {time.time() - t0:.1f}s after SIGTERM")
        answer = pending.result(30)
        assert answer.status_code == 503 and json.loads(answer.text)["error"]["code"] == "shutting_down"
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def test_the_endpoint_searches_a_follow_up_by_the_pipelines_strategy(server: tuple[str, Any]) -> None:
    """``retrieval.query: history`` behind /v1/chat/completions: the query used is reported (in
    the stream's sources chunk and the trace) and the sources are that strategy's fused ranking."""
    from rag.pipeline.queries import history_query
    from rag.retriever import fuse
    from rag.types import ChatMessage

    base, app = server
    messages = [{"role": "user", "content": "Tell me about the Zorblax Prize"},
                {"role": "assistant", "content": "It is given to underwater violinists."},
                {"role": "user", "content": "where is it awarded?"}]
    chunks = list(client(base).chat.completions.create(model="followup", messages=messages, stream=True,  # type: ignore[arg-type]
                                                       max_tokens=4, extra_body={"rag": {"include_sources": True}}))
    sources = next(c.model_extra["rag"] for c in chunks if (c.model_extra or {}).get("rag", {}).get("sources"))
    joined = history_query([ChatMessage(**m) for m in messages], 1)
    assert sources["query"] == f"where is it awarded? || {joined}"
    retriever = app.state.rag.models["followup"].pipeline.retriever
    want = fuse(retriever.search("where is it awarded?", 20), retriever.search(joined, 20), method="rrf",
                dense_weight=0.5)[:2]
    assert [(h["id"], h["score"]) for h in sources["sources"]] == [(pid, pytest.approx(sc)) for pid, sc in want]
    whole = client(base).chat.completions.create(model="followup", messages=messages, max_tokens=4,  # type: ignore[arg-type]
                                                 extra_body={"rag": {"include_trace": True}})
    assert whole.model_extra["rag"]["trace"]["query"] == sources["query"]  # type: ignore[index]
    last_only = client(base).chat.completions.create(model="chat", messages=messages, max_tokens=4,  # type: ignore[arg-type]
                                                     extra_body={"rag": {"include_trace": True}})
    assert last_only.model_extra["rag"]["trace"]["query"] == "where is it awarded?"  # type: ignore[index]
