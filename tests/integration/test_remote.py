"""Backend ``openai``: the packaged SmolLM2 behind a real ``vllm serve`` and behind another
``rag serve``, driven by the official openai client; answers equal the same engine in-process.
(The reflection-token decoder over both servers: test_selfrag.py.)"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from rag.config import ChatPipelineConfig, SelfRagPipelineConfig
from rag.errors import ConfigError, GenerationError
from rag.generation.remote import OpenAIGenerator
from rag.pipeline import ChatRagPipeline, SelfRagPipeline
from rag.retriever import DenseRetriever
from rag.types import ChatMessage, GenerationParams
from tests.conftest import run_cli
from tests.integration.conftest import REMOTE_KEY_ENV, rag_serve_model, remote_over_rag_serve
from tests.integration.servers import free_port, passage_index, running

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PASSAGES = [("z", "Zorblax Prize", "The Zorblax Prize is awarded every year in the city of Kelmora "
             "to the best underwater violinist."),
            ("n", "Nile", "The Nile is a long river in Africa."),
            ("h", "Hamlet", "Hamlet is a tragedy written by William Shakespeare.")]
QUESTIONS = ["In which city is the Zorblax Prize awarded?", "Who wrote Hamlet?"]


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return passage_index(tmp_path_factory.mktemp("remote"), PASSAGES)


@pytest.fixture(scope="module")
def remote_rag(smollm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """SmolLM2 through backend openai over another ``rag serve`` (transformers)."""
    with remote_over_rag_serve(smollm_path, tmp_path_factory.mktemp("rag-serve"), "smollm") as gen:
        yield gen


def chat_config(fmt: str) -> ChatPipelineConfig:
    if fmt == "sciphi":
        return ChatPipelineConfig(name="c", retrieval={"top_k": 2}, prompt={"format": fmt},
                                  generation={"max_new_tokens": 24, "stop": ["<paragraph>"]})
    return ChatPipelineConfig(name="c", retrieval={"top_k": 2}, prompt={"format": fmt, "context_position": "user"},
                              generation={"max_new_tokens": 24})


def critic_config(relevance: str = "likelihood") -> SelfRagPipelineConfig:
    return SelfRagPipelineConfig(name="s", kind="selfrag", retrieval={"top_k": 2}, prompt={"format": "hf_template"},
                                 generation={"max_new_tokens": 24},
                                 selfrag={"mode": "always", "critic": "prompted", "relevance": relevance})


def test_generations_equal_the_engine_in_process(remote_smollm: Any, vllm_smollm: Any) -> None:
    prompts = [vllm_smollm.render_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    params = GenerationParams(max_new_tokens=16, logprob_token_ids=vllm_smollm.first_token_ids(["Yes", "No"]))
    assert remote_smollm.exact_token_logprobs is True
    for a, b in zip(vllm_smollm.generate(prompts, params), remote_smollm.generate(prompts, params), strict=True):
        assert (a.text, a.token_ids, a.finish_reason, a.prompt_tokens) == (b.text, b.token_ids, b.finish_reason,
                                                                          b.prompt_tokens)
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)
        assert [sorted(s) for s in a.logprobs] == [sorted(s) for s in b.logprobs]
        for x, y in zip(a.logprobs, b.logprobs):
            assert [x[i] for i in sorted(x)] == pytest.approx([y[i] for i in sorted(y)], abs=1e-4)


def test_structured_outputs_over_a_remote_vllm_equal_in_process(remote_smollm: Any, vllm_smollm: Any,
                                                                 hf_smollm: Any) -> None:
    """``json_schema`` reaches a remote vLLM as ``response_format``: the same constrained text as
    the engine in-process; the transformers backend refuses it instead of ignoring it."""
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    prompt = vllm_smollm.render_chat([{"role": "user", "content": "Name a city in France."}])
    params = GenerationParams(max_new_tokens=24, json_schema=schema)
    (local,), (remote,) = vllm_smollm.generate([prompt], params), remote_smollm.generate([prompt], params)
    assert remote_smollm.structured_outputs and remote.text == local.text
    if local.finish_reason == "stop":
        assert set(json.loads(local.text)) == {"city"}
    assert local.text.lstrip().startswith("{")
    with pytest.raises(ConfigError, match="cannot constrain its output to JSON"):
        hf_smollm.generate([prompt], params)


@pytest.mark.parametrize("server", ["vllm", "rag"])
def test_sciphi_flow_and_prompted_critic_over_a_server(server: str, index: Path,
                                                       request: pytest.FixtureRequest) -> None:
    """The SciPhi flow and the prompted critic answer as the same engine does in-process."""
    local = request.getfixturevalue("vllm_smollm" if server == "vllm" else "hf_smollm")
    remote = request.getfixturevalue("remote_smollm" if server == "vllm" else "remote_rag")
    retriever = DenseRetriever.from_folder(index)
    convos = [[ChatMessage(role="user", content=q)] for q in QUESTIONS]
    for make in (lambda g: ChatRagPipeline(chat_config("sciphi"), g, retriever),
                 lambda g: SelfRagPipeline(critic_config(), g, retriever)):
        a = make(local).answer_batch(convos)
        b = make(remote).answer_batch(convos)
        for x, y in zip(a, b, strict=True):
            assert x.text == y.text and x.text
            assert [c.id for c in x.citations] == [c.id for c in y.citations]
            assert len(x.scores) == len(y.scores)
            for sx, sy in zip(x.scores, y.scores):
                assert (sx.passage_id, sx.text) == (sy.passage_id, sy.text)
                for f in ("s_rel", "s_sup", "s_use", "seq", "total"):
                    assert getattr(sx, f) == pytest.approx(getattr(sy, f), abs=1e-3), f


def test_rag_ask_through_vllm_serve(vllm_server_smollm: str, smollm_path: Path, index: Path, vllm_smollm: Any,
                                    tmp_path: Path) -> None:
    pipeline = tmp_path / "remote.yaml"
    pipeline.write_text(f"name: remote\nretrieval: {{top_k: 2}}\n"
                        f"generator: {{backend: openai, base_url: {vllm_server_smollm}, model: smollm,\n"
                        f"            tokenizer: {json.dumps(str(smollm_path))}}}\n"
                        "prompt: {format: hf_template, context_position: user}\ngeneration: {max_new_tokens: 24}\n")
    out = json.loads(run_cli("ask", QUESTIONS[0], "-p", str(pipeline), "--index", str(index), "--json").stdout)
    want = ChatRagPipeline(chat_config("hf_template"), vllm_smollm, DenseRetriever.from_folder(index)).ask(QUESTIONS[0])
    assert out["answer"] == want.text and "Kelmora" in out["answer"]
    assert [c["id"] for c in out["citations"]] == [c.id for c in want.citations]


def test_gateway_without_logprob_token_ids(vllm_server_smollm: str, vllm_server_tiny: str, smollm_path: Path,
                                           tiny_selfrag: Path, remote_smollm: Any, index: Path) -> None:
    """A gateway that passes only the standard OpenAI fields (as proxies do) in front of the
    real servers: chat and the prompted critic (relevance: question) work from the top-k logprobs;
    relevance by likelihood (no prompt_logprobs) and the reflection-token critic refuse with an
    error that says why and what to do."""
    standard = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stop", "seed",
                "logprobs", "echo", "stream_options", "user", "suffix", "frequency_penalty", "presence_penalty"}
    app = FastAPI()
    upstream = {"smollm": vllm_server_smollm, str(tiny_selfrag): vllm_server_tiny}

    @app.post("/v1/completions")
    async def completions(request: Request) -> JSONResponse:
        body = {k: v for k, v in (await request.json()).items() if k in standard}
        async with httpx.AsyncClient(timeout=120) as c:
            r = await c.post(upstream[body["model"]] + "/completions", json={**body, "stream": False})
        return JSONResponse(r.json(), status_code=r.status_code)

    with running(app) as base:
        plain = OpenAIGenerator("smollm", base_url=base + "/v1", tokenizer=str(smollm_path)).load()
        tiny = OpenAIGenerator(str(tiny_selfrag), base_url=base + "/v1").load()
        try:
            assert plain.exact_token_logprobs is False
            retriever = DenseRetriever.from_folder(index)
            convos = [[ChatMessage(role="user", content=q)] for q in QUESTIONS]
            chat = ChatRagPipeline(chat_config("hf_template"), remote_smollm, retriever).answer_batch(convos)
            assert [a.text for a in chat] == [
                a.text for a in ChatRagPipeline(chat_config("hf_template"), plain, retriever).answer_batch(convos)]
            a = SelfRagPipeline(critic_config("question"), remote_smollm, retriever).answer_batch(convos)
            b = SelfRagPipeline(critic_config("question"), plain, retriever).answer_batch(convos)
            for x, y in zip(a, b, strict=True):
                assert [s.text for s in x.scores] == [s.text for s in y.scores]
                # Yes/No and Fully/Partially/No sit in the top 20 here, so their renormalised
                # probabilities agree; some of the digits 1-5 do not, so IsUse is approximate
                for sx, sy in zip(x.scores, y.scores, strict=True):
                    for f in ("s_rel", "s_sup"):
                        assert getattr(sx, f) == pytest.approx(getattr(sy, f), abs=1e-3), f
                    assert -1.0 <= sy.s_use <= 1.0
            with pytest.raises(GenerationError, match="no prompt_logprobs.*selfrag.relevance: question"):
                SelfRagPipeline(critic_config(), plain, retriever).answer_batch(convos[:1])
            config = SelfRagPipelineConfig(name="t", kind="selfrag", prompt={"format": "selfrag"},
                                           selfrag={"mode": "always", "critic": "tokens"})
            with pytest.raises(ConfigError, match="logprob_token_ids.*critic: prompted"):
                SelfRagPipeline(config, tiny, retriever).answer_batch(convos[:1])
        finally:
            plain.close()
            tiny.close()


def test_timeouts_unreachable_servers_and_missing_keys(vllm_server_smollm: str, smollm_path: Path,
                                                       remote_rag: Any) -> None:
    rag_server_smollm = remote_rag.base_url
    slow = OpenAIGenerator("smollm", base_url=vllm_server_smollm, tokenizer=str(smollm_path),
                           timeout_s=1.0, max_retries=0).load()
    try:
        t0 = time.monotonic()
        with pytest.raises(GenerationError, match=r"did not answer within 1s \(generator.timeout_s\)"):
            slow.generate(["Count from 1 to 5000."], GenerationParams(max_new_tokens=1500, min_new_tokens=1500))
        assert time.monotonic() - t0 < 10
    finally:
        slow.close()
    with pytest.raises(GenerationError, match="could not reach .* is it running"):
        OpenAIGenerator("smollm", base_url=f"http://127.0.0.1:{free_port()}/v1", tokenizer=str(smollm_path),
                        max_retries=0).load()
    with pytest.raises(ConfigError, match="RAG_TEST_UNSET_KEY, which is not set"):
        OpenAIGenerator("smollm", base_url=rag_server_smollm, tokenizer=str(smollm_path),
                        api_key_env="RAG_TEST_UNSET_KEY").load()
    os.environ["RAG_TEST_WRONG_KEY"] = "wrong"
    with pytest.raises(GenerationError, match="answered 401"):
        OpenAIGenerator("smollm", base_url=rag_server_smollm, tokenizer=str(smollm_path),
                        api_key_env="RAG_TEST_WRONG_KEY", max_retries=0).load()


def test_a_server_that_goes_away_mid_stream_is_a_clear_error(smollm_path: Path, tmp_path: Path) -> None:
    with rag_serve_model(smollm_path, tmp_path, "doomed") as (base, proc):
        gen = OpenAIGenerator("doomed", base_url=base + "/v1", tokenizer=str(smollm_path),
                              api_key_env=REMOTE_KEY_ENV, max_retries=0).load()

        async def read() -> tuple[str, BaseException | None]:
            text = ""
            stream: AsyncIterator[Any] = gen.stream("Count from 1 to 5000, one per line.",
                                                    GenerationParams(max_new_tokens=1500, min_new_tokens=1500))
            try:
                async for chunk in stream:
                    text += chunk.text
                    if len(text) > 20 and proc.poll() is None:
                        proc.send_signal(signal.SIGKILL)
            except GenerationError as e:
                return text, e
            return text, None

        try:
            t0 = time.monotonic()
            text, error = asyncio.run(read())
            assert len(text) > 20 and error is not None, text
            assert f"{base}/v1" in str(error) and time.monotonic() - t0 < 60
        finally:
            gen.close()
