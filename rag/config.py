"""Validated configuration objects: index recipes (and, later, pipeline configs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rag.errors import ConfigError

Metric = Literal["ip", "l2"]


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class IndexRecipe(_Config):
    """How to build one index. Relative paths in a YAML recipe are relative to the project root
    (the folder holding ``indexes/``), so recipes stay portable."""

    name: str = Field(description="index name; the folder defaults to indexes/<name>")
    corpus: str = Field(description="corpus file or folder, or pydoc_data.topics")
    format: Literal["auto", "jsonl", "flashrag", "dpr", "beir", "dir", "pydoc"] = "auto"
    out: str | None = Field(None, description="output folder (default indexes/<name>)")
    embedder: str = "all-MiniLM-L6-v2"
    normalize: bool = True
    query_prompt: str = ""
    passage_prompt: str = ""
    factory: str = Field("Flat", description="FAISS factory string: Flat, HNSW32, IVF1024,PQ64 ...")
    metric: Metric = "ip"
    batch_size: int = Field(256, ge=1, description="passages encoded and checkpointed per step")
    chunk_size: int = Field(100, ge=1, description="words per chunk for text folders / pydoc")
    chunk_stride: int | None = Field(None, ge=1, description="words between chunk starts")
    skip_bad_lines: bool = False
    train_size: int | None = Field(None, ge=1, description="vectors sampled to train IVF/PQ")
    device: Literal["auto", "cpu", "gpu"] = "auto"

    @field_validator("factory")
    @classmethod
    def _factory_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("factory must be a FAISS factory string such as 'Flat' or 'HNSW32'")
        return v.strip()

    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("indexes") / self.name


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of settings at the top level")
    return data


def validation_message(path: str | Path, err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        parts.append(f"field '{loc}': {e['msg']}" + (f" (got {e['input']!r})" if e["type"] != "missing" else ""))
    return f"{path}: " + "; ".join(parts)


def load_recipe(path: str | Path) -> IndexRecipe:
    """Read an index recipe YAML; errors name the file and the field."""
    data = load_yaml(path)
    try:
        return IndexRecipe(**data)
    except ValidationError as e:
        raise ConfigError(validation_message(path, e)) from None
