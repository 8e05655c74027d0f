"""`EvalRecord`: one question's line of ``predictions.jsonl``, and the one reader and writer of
that file (resume, compare, report, calibrate and export all read it through `read_predictions`)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from rag.errors import ConfigError, validation_message
from rag.types import Answer

PREDICTIONS = "predictions.jsonl"


class EvalRecord(BaseModel):
    """What a run recorded for one question: the answer, the gold, its metrics and retrieval."""

    model_config = ConfigDict(extra="forbid")

    id: str
    question: str
    prediction: str
    gold: list[str]
    metrics: dict[str, float]
    citations: list[dict[str, Any]] = []
    hits: list[str] = []
    hit_scores: list[float] = []
    scores: list[dict[str, Any]] = []  # `rag.types.CandidateScores` as written (old runs lack s_ret)
    retrieval: dict[str, Any] | None = None
    seconds: float = 0.0
    judge_check: tuple[int, float] | None = None
    alce: dict[str, Any] | None = None

    @classmethod
    def of(cls, item_id: str, question: str, gold: Sequence[str], answer: Answer, metrics: dict[str, float],
           seconds: float) -> EvalRecord:
        top = answer.hits[:100]
        return cls(id=item_id, question=question, prediction=answer.text, gold=list(gold), metrics=metrics,
                   citations=[c.model_dump() for c in answer.citations], hits=[h.passage.id for h in top],
                   hit_scores=[round(h.score, 6) for h in top], scores=[s.model_dump() for s in answer.scores],
                   retrieval=answer.retrieval.model_dump() if answer.retrieval else None,
                   seconds=round(seconds, 4))

    def line(self) -> str:
        return json.dumps(self.model_dump(), ensure_ascii=False) + "\n"


def predictions_file(path: Path) -> Path:
    """A run's predictions.jsonl, given it or its pipeline folder (runs/NAME/PIPELINE)."""
    file = path / PREDICTIONS if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{file} does not exist; give a pipeline's folder of a rag eval run "
                          f"(runs/NAME/PIPELINE) or its {PREDICTIONS}")
    return file


def read_predictions(path: Path, *, repair: bool = False) -> list[EvalRecord]:
    """The records of a predictions.jsonl (or of a pipeline folder holding one); a bad line is an
    error naming the file and line. ``repair`` (resuming a run): a missing file has no records,
    and a half-written last line, left by a crash mid-write, is cut off."""
    if repair and not path.exists():
        return []
    file = path if repair else predictions_file(path)
    records, good_bytes = [], 0
    with file.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if repair and not raw.endswith(b"\n"):
                break
            if raw.strip():
                try:
                    records.append(EvalRecord.model_validate_json(raw))
                except ValidationError as e:
                    if repair and e.errors()[0]["type"] == "json_invalid":
                        break
                    raise ConfigError(f"{file}:{lineno}: not an eval record "
                                      f"({validation_message(e.errors())})") from None
            good_bytes += len(raw)
    if repair and good_bytes != file.stat().st_size:
        with file.open("r+b") as f:
            f.truncate(good_bytes)
    return records


def append_predictions(f: IO[str], records: Sequence[EvalRecord]) -> None:
    """Append records and make them durable (a resumed run keeps every written batch)."""
    for r in records:
        f.write(r.line())
    f.flush()
    os.fsync(f.fileno())
