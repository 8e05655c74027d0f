"""The service in-process (httpx's ASGI transport) and the CLI through Typer's CliRunner: the
same faces as the real-port and subprocess tests, without a port or a process."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from rag.cli import app as cli_app
from rag.config import load_yaml, pipeline_config, update_pipeline_file
from rag.errors import ConfigError, GenerationError, IndexCorruptError
from rag.generation.scripted import ScriptedGenerator, text_generation
from rag.pipeline import ChatRagPipeline
from rag.server import ServiceLimits, create_app
from rag.types import Hit
from tests.unit.conftest import FixedRetriever, memory_retriever

CONFIG = pipeline_config(name="inproc", prompt={"format": "sciphi"}, retrieval={"top_k": 1},
                         generation={"stop": ["<paragraph>"], "max_new_tokens": 8})
ANSWER = "The Nile is in Africa."


def call(app: Any, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://rag") as client:
            return await client.request(method, path, json=body)

    return asyncio.run(go())


def chat(content: str = "Where is the Nile?", **kw: Any) -> dict[str, Any]:
    return {"model": "inproc", "messages": [{"role": "user", "content": content}], **kw}


@pytest.fixture()
def app() -> Any:
    pipe = ChatRagPipeline(CONFIG, ScriptedGenerator(default=text_generation(ANSWER)), memory_retriever())
    return create_app(pipe, limits=ServiceLimits(max_top_k=3))


def test_chat_answer_with_its_citation_and_info_in_process(app: Any) -> None:
    r = call(app, "POST", "/v1/chat/completions", chat())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == ANSWER
    assert [c["id"] for c in body["rag"]["citations"]] == ["nile"]
    info = call(app, "GET", "/v1/info").json()
    assert info["model"] == "inproc" and info["index"]["passages"] == 3 and info["max_tokens"] == 8
    health = call(app, "GET", "/health").json()
    assert health["generator"] == "scripted" and health["passages"] == 3 and health["inflight"] == 0


@pytest.mark.parametrize(("method", "path", "body", "status", "needle"), [
    ("POST", "/v1/chat/completions", chat(rag={"top_k": 9}), 400, "rag.top_k=9 exceeds the limit of 3"),
    ("POST", "/v1/chat/completions", {"model": "inproc", "messages": [{"role": "tool", "content": "x"}]}, 400,
     "messages[0].role 'tool' is not supported"),
    ("POST", "/v1/chat/completions", {"messages": []}, 400, "field 'model'"),
    ("GET", "/v1/nowhere", None, 404, "Not Found"),
    ("GET", "/v1/chat/completions", None, 405, "Method Not Allowed"),
])
def test_errors_in_openai_shape_with_their_status(app: Any, method: str, path: str, body: dict[str, Any] | None,
                                                   status: int, needle: str) -> None:
    r = call(app, method, path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and set(err) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(("error", "status"), [(IndexCorruptError("idx: damaged"), 503),
                                               (GenerationError("backend down"), 502),
                                               (ConfigError("bad setting"), 400)])
def test_index_and_backend_errors_are_not_500(error: Exception, status: int) -> None:
    def fail(q: str) -> list[Hit]:
        raise error

    pipe = ChatRagPipeline(CONFIG, ScriptedGenerator(default=text_generation(ANSWER)), FixedRetriever(fail))
    r = call(create_app(pipe), "POST", "/v1/chat/completions", chat())
    assert r.status_code == status and r.json()["error"]["message"] == str(error)
    assert r.json()["error"]["code"] == type(error).__name__


def test_cli_builds_verifies_and_searches_in_process(tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in
                              [("a", "apples grow on trees"), ("b", "the river flows to the sea")]))
    runner = CliRunner()
    built = runner.invoke(cli_app, ["index", "build", "--corpus", str(corpus), "--out", str(tmp_path / "i"),
                                    "--embedder", "hash:32", "-q"])
    assert built.exit_code == 0, built.output
    assert json.loads(built.output)["passages"] == 2
    assert runner.invoke(cli_app, ["index", "verify", str(tmp_path / "i")]).output.strip().endswith("intact")
    found = runner.invoke(cli_app, ["search", str(tmp_path / "i"), "river sea", "--mode", "bm25", "--json"])
    assert [h["id"] for h in json.loads(found.output)][0] == "b"
    bad = runner.invoke(cli_app, ["index", "build", "--corpus", str(corpus), "--batch-size", "0"])
    assert isinstance(bad.exception, ConfigError) and "field 'batch_size'" in str(bad.exception)


def test_tune_write_back_keeps_comments_and_replaces_its_own_note(tmp_path: Path) -> None:
    p = tmp_path / "p.yaml"
    p.write_text("# my pipeline\n# rag tune fusion old note\nname: x\nretrieval:\n  top_k: 3\n")
    update_pipeline_file(p, "retrieval", {"mode": "hybrid"}, "# rag tune fusion --data q: new note")
    lines = p.read_text().splitlines()
    assert lines[:2] == ["# my pipeline", "# rag tune fusion --data q: new note"]
    assert load_yaml(p)["retrieval"] == {"top_k": 3, "mode": "hybrid"}
    with pytest.raises(ConfigError, match="field 'retrieval.mode'"):
        update_pipeline_file(p, "retrieval", {"mode": "psychic"}, "# rag tune fusion x")
    assert load_yaml(p)["retrieval"]["mode"] == "hybrid"  # a refused change writes nothing


def test_sampling_fields_reach_the_generation_params() -> None:
    from rag.server.protocol import CompletionRequest
    from rag.server.sampling import generation_params
    from rag.types import GenerationParams

    req = CompletionRequest(model="m", prompt="x", max_tokens=9, temperature=0.7, top_p=0.9, top_k=40, seed=3,
                            stop="END", min_tokens=2)
    p = generation_params(req, GenerationParams(stop=["<paragraph>"]), ServiceLimits())
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.min_new_tokens) == (9, 0.7, 0.9, 40, 3, 2)
    assert p.stop == ["<paragraph>", "END"]
    assert generation_params(req.model_copy(update={"top_k": -1}), GenerationParams(), ServiceLimits()).top_k == 0
