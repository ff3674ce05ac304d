"""Shared test helpers: an app on a temporary data dir with small models injected, and image makers."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.registry import ModelRegistry
from service.settings import Settings

torch.set_num_threads(2)


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (64, 128), stripe: int | None = None) -> bytes:
    """A person-crop-sized PNG with a uniform colour and an optional darker horizontal stripe."""
    array = np.zeros((size[1], size[0], 3), np.uint8)
    array[:] = color
    if stripe is not None:
        array[stripe:stripe + 8] //= 2
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    return Settings(data_dir=data_dir, weights_dir=data_dir / "no-weights", methods="", warmup=False,
                    max_batch_wait_ms=1.0, **overrides)


@pytest.fixture
def app_factory(tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    """Build (and on teardown close) TestClients over one data dir; ``models`` maps method -> model object."""
    clients: list[TestClient] = []

    def build(models: dict[str, Any], data_dir: Path | None = None, **overrides: Any) -> TestClient:
        settings = make_settings(data_dir or tmp_path / "data", **overrides)
        registry = ModelRegistry(settings)
        for method, model in models.items():
            registry.register(method, model)
        client = TestClient(create_app(settings, registry, load_models=False))
        client.__enter__()
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)
