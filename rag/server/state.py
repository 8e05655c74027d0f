"""What the routers share: the pipeline, the limits, metrics and admission (``app.state.rag``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from rag.pipeline import Pipeline
from rag.server.admission import Admission
from rag.server.metrics import Metrics
from rag.server.protocol import ServiceLimits
from rag.types import GenerationParams


@dataclass
class ServerState:
    pipeline: Pipeline
    model_name: str
    limits: ServiceLimits
    runs_dir: Path | None = None
    api_key: str | None = None
    metrics: Metrics = field(default_factory=Metrics)
    created: int = field(default_factory=lambda: int(time.time()))
    admission: Admission = field(init=False)
    generation: GenerationParams | None = field(init=False)  # the pipeline's defaults; None: no generator

    def __post_init__(self) -> None:
        self.admission = Admission(self.limits.max_inflight, self.limits.timeout_s, self.metrics)
        self.generation = self.pipeline.info().generation


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.rag
    return state


#: A route parameter that receives the app's `ServerState`.
State = Annotated[ServerState, Depends(_state)]
