"""``rag serve``: a pipeline over the OpenAI-compatible HTTP API, with the playground page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from rag.cli._common import IndexOpt, open_pipelines, pipeline_files

Pipelines = Annotated[list[Path] | None, typer.Option(
    "--pipeline", "-p", help="pipeline YAML or a folder of them; repeat to serve several (a request's "
    "model picks one by its name; equal generator settings share one engine). Default: the packaged one")]


def serve(
    pipeline: Pipelines = None,
    index: IndexOpt = None,
    host: Annotated[str, typer.Option(help="bind address (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    max_inflight: Annotated[int, typer.Option(help="requests in flight (streams too) before 429")] = 64,
    timeout: Annotated[float, typer.Option(help="per-request timeout in seconds")] = 120.0,
    runs: Annotated[Path | None, typer.Option(
        help="folder of rag eval runs the playground page may open", exists=True, file_okay=False)] = None,
    private_probes: Annotated[bool, typer.Option(
        help="/health and /metrics need the API key too (default: public, like the page)")] = False,
    ray: Annotated[str | None, typer.Option(
        help="serve as a Ray Serve application: 'local' (a cluster of this machine), 'auto' or HOST:PORT")] = None,
    replicas: Annotated[int, typer.Option(min=1, help="with --ray: replicas of the service")] = 1,
    shard_replicas: Annotated[int, typer.Option(
        min=1, help="with --ray: replicas of each shard's search deployment (sharded indexes)")] = 1,
) -> None:
    """Serve one or more pipelines over an OpenAI-compatible HTTP API and a playground page at /
    (RAG_API_KEY enables auth); with --ray, as replicas on a Ray cluster."""
    from rag.server import ServiceLimits
    from rag.server import serve as run_server
    from rag.settings import get_settings

    limits = ServiceLimits(max_inflight=max_inflight, timeout_s=timeout)
    common: dict[str, Any] = {"api_key": get_settings().api_key, "limits": limits, "private_probes": private_probes}
    if ray is not None:
        from rag.config import DEFAULT_PIPELINE
        from rag.server.ray_serve import replica_spec, serve_on_ray

        spec = replica_spec(pipeline_files(pipeline or [DEFAULT_PIPELINE]), index,
                            runs_dir=str(runs.resolve()) if runs else None, **common)
        typer.echo(f"serving on Ray ({ray}, {replicas} replica(s)) at http://{host}:{port}/v1", err=True)
        serve_on_ray(spec, address=ray, host=host, port=port, replicas=replicas, shard_replicas=shard_replicas)
        return
    with open_pipelines(pipeline or [], index) as pipes:
        names = ", ".join(p.info().name for p in pipes)
        typer.echo(f"serving {names} on http://{host}:{port}/v1 (playground: http://{host}:{port}/)", err=True)
        run_server(pipes, host=host, port=port, runs_dir=runs, **common)
