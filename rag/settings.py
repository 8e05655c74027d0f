"""Environment settings (``RAG_*`` variables)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAG_", extra="ignore")

    cache_dir: Path = Field(Path.home() / ".cache" / "rag",
                            description="prepared models (the packaged SmolLM2 as an HF folder)")
    api_key: str | None = Field(None, description="if set, the HTTP service requires it")
    device: str = Field("auto", description="auto | cpu | gpu")


def get_settings() -> Settings:
    return Settings()
