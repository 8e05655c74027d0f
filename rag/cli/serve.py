"""``rag serve``: a pipeline over the OpenAI-compatible HTTP API, with the playground page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rag.cli._common import IndexOpt, open_pipelines

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
) -> None:
    """Serve one or more pipelines over an OpenAI-compatible HTTP API and a playground page at /
    (RAG_API_KEY enables auth)."""
    from rag.server import ServiceLimits
    from rag.server import serve as run_server
    from rag.settings import get_settings

    with open_pipelines(pipeline or [], index) as pipes:
        names = ", ".join(p.info().name for p in pipes)
        typer.echo(f"serving {names} on http://{host}:{port}/v1 (playground: http://{host}:{port}/)", err=True)
        run_server(pipes, host=host, port=port, api_key=get_settings().api_key, private_probes=private_probes,
                   limits=ServiceLimits(max_inflight=max_inflight, timeout_s=timeout), runs_dir=runs)
