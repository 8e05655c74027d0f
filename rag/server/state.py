"""What the routers share: the served pipelines by model name, the limits, metrics and
admission (``app.state.rag``)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from rag.errors import ConfigError
from rag.pipeline import Pipeline
from rag.server.admission import Admission
from rag.server.errors import HTTPError
from rag.server.metrics import Metrics
from rag.server.protocol import ServiceLimits
from rag.types import GenerationParams


@dataclass(frozen=True)
class Served:
    """One served pipeline: the name clients pass as ``model``, its kind and its generation
    defaults (None: no generator), read once at start."""

    name: str
    pipeline: Pipeline
    kind: str
    generation: GenerationParams | None

    @classmethod
    def of(cls, name: str, pipeline: Pipeline) -> Served:
        info = pipeline.info()
        return cls(name, pipeline, info.kind, info.generation)


@dataclass
class ServerState:
    models: dict[str, Served]
    limits: ServiceLimits
    runs_dir: Path | None = None
    api_key: str | None = None
    private_probes: bool = False  # /health and /metrics need the key too
    metrics: Metrics = field(default_factory=Metrics)
    created: int = field(default_factory=lambda: int(time.time()))
    admission: Admission = field(init=False)

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("a server needs at least one pipeline")
        self.admission = Admission(self.limits.max_inflight, self.limits.timeout_s, self.metrics)

    @classmethod
    def of(cls, pipelines: Mapping[str, Pipeline], limits: ServiceLimits, **kw: object) -> ServerState:
        return cls({name: Served.of(name, p) for name, p in pipelines.items()}, limits, **kw)  # type: ignore[arg-type]

    def pick(self, model: str | None) -> Served:
        """The pipeline a request names (None: the first served); 404 ``model_not_found``."""
        if model is None:
            return next(iter(self.models.values()))
        served = self.models.get(model)
        if served is None:
            raise HTTPError(404, f"the model {model!r} does not exist; this server serves "
                                 f"{', '.join(map(repr, self.models))} (GET /v1/models)",
                            param="model", code="model_not_found")
        return served

    def pipelines(self) -> list[Pipeline]:
        return [s.pipeline for s in self.models.values()]


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.rag
    return state


#: A route parameter that receives the app's `ServerState`.
State = Annotated[ServerState, Depends(_state)]
