"""Service settings: environment variables prefixed ``VLS_`` or a ``.env``-style file named by ``VLS_ENV_FILE``."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the service, with the embedded defaults (CPU, FAISS on disk, in-process cache)."""

    model_config = SettingsConfigDict(env_prefix="VLS_", env_file=os.environ.get("VLS_ENV_FILE"), extra="ignore")

    data_dir: Path = Field(Path("data"), description="collections (SQLite + FAISS snapshots + images)")
    weights_dir: Path = Field(Path("weights"), description="checkpoints; weights/manifest.json names them")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16", "official"] = Field(
        "fp32", description="fp32 everywhere; bf16/fp16 autocast; 'official' = each method's released dtype mix"
    )
    methods: str = Field("irra,ivt,laps,scanformer,magnet", description="comma-separated methods to load")
    redis_url: str | None = Field(None, description="e.g. redis://127.0.0.1:6379/0; unset = in-process cache")
    api_keys: str = Field("", description="comma-separated keys; empty = no auth")
    rate_limit_per_minute: int = Field(0, ge=0, description="requests per key per minute; 0 = unlimited")
    max_upload_bytes: int = Field(20 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(40_000_000, gt=0, description="larger images are refused with 413")
    max_batch_size: int = Field(32, gt=0, description="micro-batcher: most requests encoded together")
    max_batch_wait_ms: float = Field(5.0, ge=0, description="micro-batcher: longest wait to fill a batch")
    max_queue: int = Field(1024, gt=0, description="micro-batcher: pending requests before 503")
    text_cache_size: int = Field(10_000, ge=0, description="in-process text-embedding cache entries")
    snapshot_every: int = Field(1000, gt=0, description="write a FAISS snapshot after this many changes")
    ivf_threshold: int = Field(
        50_000, gt=0, description="collections at least this large are indexed IVF-Flat (exact scores of the probed "
        "cells) when their index is built; smaller ones exact flat")
    warmup: bool = True

    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]

    def api_key_set(self) -> set[str]:
        return {k.strip() for k in self.api_keys.split(",") if k.strip()}

    def torch_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
