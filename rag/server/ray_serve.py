"""``rag serve --ray``: the same app (`rag.server.app.create_app`: routes, playground, auth,
limits, timeouts, streaming) as a Ray Serve application.

One ingress deployment (``rag``) with ``replicas`` replicas; each replica builds the pipelines
from their files when it starts (its generator inside it, or remote with ``backend: openai``)
and serves the app through Serve's ASGI ingress. Serve's proxy on ``host:port`` spreads requests
over the replicas (at most ``limits.max_inflight`` at once on each) and its controller replaces
a replica whose process dies, while the others keep answering. Each shard of a sharded index
folder is a deployment of its own (`rag.sharded.ShardSearch`, ``shard_replicas`` replicas) that
the service's replicas fan a query out to, so no process holds the whole index.

The driver (the ``rag serve --ray`` process) deploys the application and waits; SIGTERM or
Ctrl-C deletes what it deployed (`serve.shutdown`: replicas, proxy, controller) and, when it
started the Ray cluster itself (``--ray local``), stops the cluster's processes too.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rag.config import PipelineConfig
from rag.errors import ConfigError, missing_extra
from rag.server.protocol import ServiceLimits

log = logging.getLogger(__name__)
APP_NAME = "rag"
SHARD_CPUS = 0.5  # a shard replica mostly waits on memory-bound FAISS scans; the service's replicas take 1


@dataclass(frozen=True)
class ReplicaSpec:
    """What each replica builds its app from (sent to the replicas, so plain data): the pipeline
    configs with their index folders made absolute (a replica's working directory is not the
    driver's)."""

    pipelines: list[PipelineConfig]
    index: str | None = None
    api_key: str | None = None
    limits: ServiceLimits = field(default_factory=ServiceLimits)
    runs_dir: str | None = None
    private_probes: bool = False


def replica_spec(files: list[Path], index: Path | None, **kw: Any) -> ReplicaSpec:
    """The spec of ``files`` (read and checked here, before anything is deployed)."""
    from rag.config import load_pipeline_config

    configs = [load_pipeline_config(f) for f in files]
    configs = [c.model_copy(update={"index": str(Path(c.index).resolve())}) if c.index else c for c in configs]
    return ReplicaSpec(configs, str(index.resolve()) if index else None, **kw)


def _folder(spec: ReplicaSpec, config: PipelineConfig) -> str | None:
    return None if config.retrieval.mode == "none" else (spec.index or config.index)


def build_replica_app(spec: ReplicaSpec, shards: dict[str, list[Any]] | None = None) -> Any:
    """The app of one replica: its own pipelines, loaded before it takes requests, closed when
    Serve stops it. ``shards``: per sharded index folder, the handles of its shard deployments."""
    from rag.pipeline import build_pipelines
    from rag.retriever import Retriever
    from rag.server.app import create_app
    from rag.sharded import RemoteShards

    def retriever_for(config: PipelineConfig) -> Retriever | None:
        folder = _folder(spec, config)
        if not shards or folder not in shards:
            return None
        return RemoteShards.of(folder, shards[folder], config.retrieval.mode,  # type: ignore[arg-type]
                               fusion=config.retrieval.fusion.model_dump())

    pipes = build_pipelines(spec.pipelines, index=spec.index, retriever_for=retriever_for)
    for p in pipes:
        p.load()
    return create_app(pipes, api_key=spec.api_key, limits=spec.limits, private_probes=spec.private_probes,
                      runs_dir=Path(spec.runs_dir) if spec.runs_dir else None, close_pipelines=True)


def _import_serve() -> tuple[Any, Any]:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise missing_extra("ray[serve]", "ray") from None
    return ray, serve


def _shard_deployments(serve: Any, spec: ReplicaSpec, replicas: int) -> dict[str, list[Any]]:
    """Per sharded index folder the pipelines search: one bound `ShardSearch` deployment per
    shard (BM25 statistics of the whole folder computed here, where the shards are read)."""
    from rag.index.shards import is_sharded, shard_folders
    from rag.sharded import ShardSearch, corpus_stats

    out: dict[str, list[Any]] = {}
    for n, folder in enumerate(sorted({f for c in spec.pipelines if (f := _folder(spec, c)) and is_sharded(f)})):
        lexical = any(_folder(spec, c) == folder and c.retrieval.mode in ("bm25", "hybrid") for c in spec.pipelines)
        parts = shard_folders(folder)
        stats = corpus_stats(folder) if lexical else None
        out[folder] = [serve.deployment(ShardSearch, name=f"index{n}-shard{i}", num_replicas=replicas,
                                        ray_actor_options={"num_cpus": SHARD_CPUS}).bind(str(f), stats)
                       for i, f in enumerate(parts)]
    return out


def deploy(spec: ReplicaSpec, *, host: str, port: int, replicas: int, shard_replicas: int = 1) -> Any:
    """Deploy the application on the connected cluster; returns its handle."""
    _, serve = _import_serve()

    @serve.ingress()
    class RagIngress:
        def __init__(self, spec: ReplicaSpec, shards: dict[str, list[Any]]):
            self.spec, self.shards = spec, shards

        async def __serve_build_asgi_app__(self) -> Any:  # off the replica's loop: shard calls block
            return await asyncio.to_thread(build_replica_app, self.spec, self.shards)

    deployment = serve.deployment(
        RagIngress, name=APP_NAME, num_replicas=replicas, max_ongoing_requests=spec.limits.max_inflight,
        health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=5,
        graceful_shutdown_wait_loop_s=1)
    serve.start(http_options={"host": host, "port": port}, detached=False)
    shards = _shard_deployments(serve, spec, shard_replicas)
    return serve.run(deployment.bind(spec, shards), name=APP_NAME, route_prefix="/", blocking=False)


def connect(address: str) -> bool:
    """Join the cluster at ``address`` ('auto', HOST:PORT) or, for 'local', start one here;
    True when this process started it (and so stops it)."""
    ray, _ = _import_serve()
    local = address == "local"
    try:
        ray.init(address=None if local else address, include_dashboard=False if local else None,
                 logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError) as e:
        raise ConfigError(f"cannot join the Ray cluster at {address!r}: {e}. Start one with 'ray start --head', "
                          "or pass --ray local for a cluster of this machine alone") from None
    return local


def serve_on_ray(spec: ReplicaSpec, *, address: str, host: str = "127.0.0.1", port: int = 8000,
                 replicas: int = 1, shard_replicas: int = 1) -> None:
    """Deploy, wait for SIGTERM or Ctrl-C, then delete what was deployed (blocking)."""
    ray, serve = _import_serve()
    if replicas < 1:
        raise ConfigError(f"--replicas {replicas}: give 1 or more")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    started = connect(address)
    try:
        deploy(spec, host=host, port=port, replicas=replicas, shard_replicas=shard_replicas)
        log.warning("serving on http://%s:%d/v1 with %d replica(s) on Ray", host, port, replicas)
        while not stop.wait(0.5):
            pass
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()
