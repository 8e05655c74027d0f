"""``rag serve --ray`` on a real two-node Ray cluster on this machine (`ray.cluster_utils.Cluster`):
chat through the official ``openai`` client (JSON and streaming) from two replicas of the packaged
SmolLM2 pipeline over a 2-shard index whose shards are deployments of their own; search through
those deployments equal to the unsharded index (50 queries, dense, BM25 and hybrid); a replica's
process killed under load while requests keep
succeeding (client retries bounded, none hangs) and Serve replacing it; SIGTERM to the driver
deleting everything it deployed."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest

from tests.integration.servers import server_process

pytestmark = [pytest.mark.integration, pytest.mark.slow]
RAG = str(Path(sys.executable).with_name("rag"))
REPLICA = "ServeReplica:rag:rag"
Served = tuple[str, Any, dict[str, Any]]  # base URL, the rag serve process, the unsharded index and queries
PASSAGES = [("z", "Zorblax Prize", "The Zorblax Prize is awarded every year in Kelmora to the best underwater "
             "violinist."), ("n", "Nile", "The Nile is a long river in Africa."),
            ("t", "Tea", "Tea is grown in Assam and Darjeeling."), ("p", "Paris", "Paris is the capital of France.")]


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "include_dashboard": False})
    c.add_node(num_cpus=4)
    c.wait_for_nodes()
    yield c.address
    c.shutdown()


def replicas(address: str) -> list[psutil.Process]:
    """The live replica processes (Ray titles an actor's process ``ray::<actor class>``)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.info["cmdline"] and p.info["cmdline"][0].startswith(f"ray::{REPLICA}") and p.status() != "zombie":
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.fixture(scope="module")
def served(cluster: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``rag serve --ray`` of a chat pipeline and three retrieval pipelines (one per mode) over a
    2-shard folder of 200 SciFact abstracts and the passages above: two service replicas, each
    shard a deployment of its own."""
    from tests.conftest import SHARED_DATA, run_cli

    base = SHARED_DATA / "beir-scifact"
    if not base.is_dir():
        pytest.skip("../shared/data/beir-scifact is not here")
    tmp = tmp_path_factory.mktemp("ray-serve")
    docs = [json.loads(x) for x in (base / "corpus.jsonl").read_text().splitlines()[:200]]
    docs += [{"_id": i, "title": t, "text": x} for i, t, x in PASSAGES]
    (tmp / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    for args in (["build", "--corpus", str(tmp / "corpus.jsonl"), "--format", "beir", "--out", str(tmp / "idx"), "-q"],
                 ["shard", str(tmp / "idx"), "--shards", "2", "--out", str(tmp / "sharded")]):
        r = run_cli("index", *args)
        assert r.returncode == 0, r.stderr
    index = json.dumps(str(tmp / "sharded"))
    (tmp / "chat.yaml").write_text(f"name: chat\nindex: {index}\nretrieval: {{top_k: 1}}\n"
                                   "prompt: {format: hf_template, context_position: user}\n"
                                   "generation: {max_new_tokens: 12}\n"
                                   "generator: {backend: hf, model: smollm2-135m-instruct, dtype: float32}\n")
    for mode in ("dense", "bm25", "hybrid"):
        (tmp / f"search-{mode}.yaml").write_text(f"name: search-{mode}\nkind: retrieval\nindex: {index}\n"
                                                 f"retrieval: {{mode: {mode}, top_k: 10}}\n")
    queries = [json.loads(x)["text"] for x in (base / "queries.jsonl").read_text().splitlines()[:50]]
    with server_process(lambda port: [RAG, "serve", "-p", str(tmp), "--ray", cluster, "--replicas", "2",
                                      "--port", str(port)], tmp / "serve.log", start_timeout_s=240) as (url, proc):
        yield url, proc, {"idx": tmp / "idx", "queries": queries}


def client(base: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=retries, timeout=60)


def ask(base: str, retries: int = 0, **kw: Any) -> Any:
    return client(base, retries).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "Where is the Zorblax Prize awarded?"}],
        temperature=0, max_tokens=12, extra_body={"rag": {"include_sources": True}}, **kw)


def test_chat_json_and_streaming_through_two_replicas(served: Served, cluster: str) -> None:
    base, _, _ = served
    assert len(replicas(cluster)) == 2
    whole = ask(base)
    assert whole.choices[0].message.content and whole.model_extra["rag"]["sources"][0]["id"] == "z"
    chunks = list(ask(base, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content  # greedy: both replicas answer alike
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_search_through_the_shard_deployments_equals_the_unsharded_index(
        served: Served, cluster: str) -> None:
    import httpx

    from rag.retriever import open_retriever, query_embedder
    from rag.types import Hit, Passage
    from tests.integration.test_shards import same_ranking

    base, _, data = served
    assert len([p for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [""])[0].startswith(
        "ray::ServeReplica:rag:index0-shard")]) == 2  # each shard searched in a process of its own
    encoder = query_embedder(open_retriever(data["idx"], "dense"))
    for mode in ("dense", "bm25", "hybrid"):
        local = open_retriever(data["idx"], mode, embedder=encoder)
        for q in data["queries"]:
            r = httpx.post(base + "/v1/retrieve", json={"model": f"search-{mode}", "query": q, "top_k": 10}, timeout=60)
            assert r.status_code == 200, r.text
            got = [Hit(passage=Passage(id=h["id"], title=h["title"], text=h["text"]), score=h["score"], rank=h["rank"])
                   for h in r.json()["data"]]
            same_ranking(local.search(q, 10), got)
        local.close()


def test_a_killed_replica_is_replaced_while_requests_keep_succeeding(served: Served, cluster: str) -> None:
    base, _, _ = served
    victim = replicas(cluster)[0]
    deadline = time.time() + 120

    def one(_: int) -> float:
        t = time.time()
        assert ask(base, retries=3).choices[0].message.content
        return time.time() - t

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, i) for i in range(24)]
        time.sleep(1.0)
        victim.kill()  # the replica's process, mid-load
        times = [f.result(timeout=180) for f in futures]
    assert all(t < 120 for t in times)  # none hung
    while len(replicas(cluster)) < 2 or victim.pid in {p.pid for p in replicas(cluster)}:
        assert time.time() < deadline, "Serve did not replace the killed replica"
        time.sleep(1)
    assert ask(base).choices[0].message.content


def test_sigterm_deletes_what_the_driver_deployed(served: Served, cluster: str) -> None:
    base, proc, _ = served
    proc.send_signal(signal.SIGTERM)
    t = time.time()
    proc.wait(60)
    assert time.time() - t < 30
    deadline = time.time() + 30
    while replicas(cluster):
        assert time.time() < deadline, "replicas outlived the driver"
        time.sleep(1)
    with pytest.raises(openai.APIConnectionError):
        ask(base)
