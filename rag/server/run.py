"""`serve`: the app on uvicorn, stopped cleanly by SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from rag.errors import missing_extra
from rag.pipeline import Pipeline
from rag.server.app import create_app
from rag.server.protocol import ServiceLimits


def serve(pipelines: Pipeline | Sequence[Pipeline], *, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, limits: ServiceLimits | None = None, runs_dir: Path | None = None,
          private_probes: bool = False) -> None:
    """Run the service with uvicorn (blocking). SIGTERM or Ctrl-C aborts in-flight requests at
    once, and the pipelines' engines (threads and processes) are shut down before this returns."""
    try:
        import uvicorn
    except ImportError:
        raise missing_extra("uvicorn", "serve") from None
    app = create_app(pipelines, api_key=api_key, limits=limits, runs_dir=runs_dir, private_probes=private_probes)
    served = app.state.rag.pipelines()
    for p in served:
        p.load()  # the engines start before the port opens, not on the first request
    admission = app.state.rag.admission

    class Server(uvicorn.Server):
        loop: asyncio.AbstractEventLoop | None = None

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.loop is not None:  # abort in-flight work now, not after the grace period
                self.loop.call_soon_threadsafe(admission.abort_all)
            super().handle_exit(sig, frame)

        async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)  # type: ignore[arg-type]

    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5))
    try:
        server.run()
    finally:
        for p in served:
            p.close()
