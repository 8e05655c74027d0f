"""The OpenAI contract in-process (httpx's ASGI transport, scripted generator): every field is
honoured or refused with a 400 naming it, strict types, model routing over two pipelines, the
embeddings the index searches with, the stream's usage chunk, and client mistakes that are 4xx
rather than 500."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import httpx
import numpy as np
import pytest

from rag.config import pipeline_config
from rag.generation.scripted import ScriptedGenerator, text_generation
from rag.pipeline import ChatRagPipeline
from rag.server import create_app
from tests.unit.conftest import memory_retriever


def _pipe(name: str, answer: str, generator: ScriptedGenerator | None = None) -> ChatRagPipeline:
    config = pipeline_config(name=name, prompt={"format": "sciphi"}, retrieval={"top_k": 1},
                             generation={"stop": ["<paragraph>"], "max_new_tokens": 8})
    return ChatRagPipeline(config, generator or ScriptedGenerator(default=text_generation(answer)), memory_retriever())


@pytest.fixture()
def app() -> Any:
    return create_app([_pipe("docs", "From the docs."), _pipe("wiki", "From the wiki.")])


def send(app: Any, method: str, path: str, body: Any = None, *, content: bytes | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://rag") as client:
            if content is not None:
                return await client.request(method, path, content=content, headers={"content-type": "application/json"})
            return await client.request(method, path, json=body)

    return asyncio.run(go())


def chat(model: str = "docs", **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Where is the Nile?"}], **kw}


def test_model_picks_the_pipeline_and_an_unknown_model_is_404(app: Any) -> None:
    assert [m["id"] for m in send(app, "GET", "/v1/models").json()["data"]] == ["docs", "wiki"]
    for model, text in (("docs", "From the docs."), ("wiki", "From the wiki.")):
        r = send(app, "POST", "/v1/chat/completions", chat(model))
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == text
        assert r.json()["model"] == model
    r = send(app, "POST", "/v1/chat/completions", chat("gpt-4o"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "'docs', 'wiki'" in r.json()["error"]["message"]
    info = send(app, "GET", "/v1/info?model=wiki").json()
    assert info["model"] == "wiki" and info["models"] == ["docs", "wiki"]


@pytest.mark.parametrize(("extra", "param", "needle"), [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tool calling is not implemented"),
    ({"tool_choice": "auto"}, "tool_choice", "not implemented"),
    ({"logit_bias": {"5": 10}}, "logit_bias", "not implemented"),
    ({"presence_penalty": 0.5}, "presence_penalty", "not implemented"),
    ({"logprobs": True, "stream": True}, "logprobs", "only without stream"),
    ({"top_logprobs": 2}, "top_logprobs", "needs logprobs: true"),
    ({"response_format": {"type": "json_object"}}, "response_format", "generator.backend vllm"),
    ({"colour": "red"}, "colour", "unknown field"),
    ({"max_tokens": True}, "max_tokens", "valid integer"),
    ({"stream": "yes"}, "stream", "valid boolean"),
    ({"seed": 2**70}, "seed", "seed"),
    ({"stop": ["x"] * 17}, "stop", "at most 16"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream is true"),
    ({"stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options.continuous_usage_stats",
     "unknown field"),
])
def test_fields_not_honoured_are_refused_naming_the_field(app: Any, extra: dict[str, Any], param: str,
                                                         needle: str) -> None:
    r = send(app, "POST", "/v1/chat/completions", chat(**extra))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"], err


def test_harmless_fields_and_neutral_values_are_accepted(app: Any) -> None:
    r = send(app, "POST", "/v1/chat/completions", chat(user="u1", metadata={"k": "v"}, store=False,
                                                       presence_penalty=0, frequency_penalty=0.0, tools=[]))
    assert r.status_code == 200, r.text


def test_stream_usage_comes_last_with_no_choices_only_when_asked(app: Any) -> None:
    def events(body: dict[str, Any]) -> list[dict[str, Any]]:
        text = send(app, "POST", "/v1/chat/completions", body).text
        return [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:") and "[DONE]" not in line]

    asked = events(chat(stream=True, stream_options={"include_usage": True}))
    assert asked[-1]["choices"] == [] and asked[-1]["usage"]["completion_tokens"] > 0
    assert asked[-2]["choices"][0]["finish_reason"] == "stop" and "usage" not in asked[-2]
    plain = events(chat(stream=True))
    assert all("usage" not in e for e in plain) and plain[-1]["choices"][0]["finish_reason"] == "stop"


def test_embeddings_are_the_vectors_the_index_searches_with(app: Any) -> None:
    texts = ["Where is the Nile?", "apples"]
    want = app.state.rag.models["wiki"].pipeline.retriever.embedder.encode_queries(texts)
    floats = send(app, "POST", "/v1/embeddings", {"model": "wiki", "input": texts}).json()
    assert [d["index"] for d in floats["data"]] == [0, 1]
    np.testing.assert_allclose(np.array([d["embedding"] for d in floats["data"]]), want, rtol=1e-6)
    b64 = send(app, "POST", "/v1/embeddings", {"model": "wiki", "input": texts[0], "encoding_format": "base64"})
    vec = np.frombuffer(base64.b64decode(b64.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(vec, want[0].astype("<f4"))
    r = send(app, "POST", "/v1/embeddings", {"model": "wiki", "input": "x", "dimensions": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions"


def test_tokenize_and_detokenize_round_trip(app: Any) -> None:
    t = send(app, "POST", "/tokenize", {"model": "docs", "prompt": "the Nile river", "return_token_strs": True}).json()
    assert t["count"] == len(t["tokens"]) == 3 and "".join(t["token_strs"]) == "theNileriver"
    d = send(app, "POST", "/detokenize", {"model": "docs", "tokens": t["tokens"]}).json()
    assert d["prompt"] == "theNileriver"  # the scripted tokenizer drops spaces
    r = send(app, "POST", "/detokenize", {"model": "docs", "tokens": [10**6]})
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]


@pytest.mark.parametrize(("content", "path"), [
    (b'{"model": "docs", "messages": [{"role": "user", "content": "\xff\xfe"}]}', "/v1/chat/completions"),
    (b"[" * 20000 + b"]" * 20000, "/v1/chat/completions"),
    (b'{"model": "docs", "messages": [{"role": "user", "content": "\\ud800"}]}', "/v1/chat/completions"),
    (b'{"model": "docs", "prompt": [true]}', "/v1/completions"),
    (b'{"model": "docs", "prompt": "x", "stop_token_ids": [1180591620717411303424]}', "/v1/completions"),
])
def test_client_mistakes_are_4xx_in_openai_shape(app: Any, content: bytes, path: str) -> None:
    r = send(app, "POST", path, content=content)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["message"]


def test_openapi_404_405_and_metrics_by_route_template(app: Any) -> None:
    assert send(app, "GET", "/openapi.json").status_code == 200
    for i in range(5):
        r = send(app, "GET", f"/probe/{i}")
        assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    assert send(app, "GET", "/v1/chat/completions").json()["error"]["message"] == "Method Not Allowed"
    metrics = send(app, "GET", "/metrics").text
    assert 'route="unmatched",status="404"} 5.0' in metrics and "/probe/" not in metrics


@pytest.mark.parametrize(("prompt", "needle"), [([], "1 to 64 prompts"), ([[]], "the prompt is empty"),
                                                ([[1, 2], [3, 10**6]], "outside this model's vocabulary")])
def test_empty_and_out_of_vocabulary_token_prompts_are_400(app: Any, prompt: Any, needle: str) -> None:
    r = send(app, "POST", "/v1/completions", {"model": "docs", "prompt": prompt, "max_tokens": 2})
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_probes_can_need_the_key_too() -> None:
    open_app = create_app(_pipe("docs", "x"), api_key="k")
    assert send(open_app, "GET", "/metrics").status_code == 200
    private = create_app(_pipe("docs", "x"), api_key="k", private_probes=True)
    assert send(private, "GET", "/metrics").status_code == 401 and send(private, "GET", "/health").status_code == 401
    assert send(private, "GET", "/").status_code == 200  # the page holds nothing secret


def test_a_folder_linked_into_runs_is_not_served(tmp_path: Any) -> None:
    outside, runs = tmp_path / "outside", tmp_path / "runs"
    (outside / "secret").mkdir(parents=True)
    (outside / "secret" / "report.md").write_text("# secret\n")
    (runs / "mine").mkdir(parents=True)
    (runs / "mine" / "report.md").write_text("# mine\n")
    (runs / "linked").symlink_to(outside / "secret", target_is_directory=True)
    app = create_app(_pipe("docs", "x"), runs_dir=runs)
    assert [r["name"] for r in send(app, "GET", "/v1/runs").json()["data"]] == ["mine"]
    assert send(app, "GET", "/v1/runs/file?run=linked&name=report.md").status_code == 404
    assert send(app, "GET", "/v1/runs/file?run=mine&name=report.md").text == "# mine\n"


def test_health_is_503_when_an_index_cannot_be_read() -> None:
    from rag.errors import IndexCorruptError

    pipe = _pipe("docs", "x")

    def unreadable() -> Any:
        raise IndexCorruptError("idx/passages.db: damaged")

    app = create_app([pipe, _pipe("wiki", "y")])
    assert send(app, "GET", "/health").status_code == 200
    pipe.retriever.describe = unreadable  # type: ignore[union-attr,method-assign]
    health = send(app, "GET", "/health")
    assert health.status_code == 503 and health.json()["status"] == "error"
    by_model = {p["model"]: p for p in health.json()["pipelines"]}
    assert not by_model["docs"]["ok"] and "damaged" in by_model["docs"]["error"] and by_model["wiki"]["ok"]
