"""Encoding through the micro-batchers, with the shared text-embedding cache in front."""

from __future__ import annotations

import asyncio

import numpy as np
from PIL import Image

from service.cache import content_key
from service.registry import ModelEntry
from service.state import AppState


async def embed_texts(state: AppState, entry: ModelEntry, texts: list[str]) -> np.ndarray:
    keys = [content_key(entry.method, entry.version, "text", t.encode("utf-8")) for t in texts]
    cached = [state.cache.get(k) for k in keys]
    todo = [i for i, v in enumerate(cached) if v is None]
    if todo:
        fresh = await entry.batchers["text"].submit_many([texts[i] for i in todo])
        for i, vector in zip(todo, fresh, strict=True):
            cached[i] = np.asarray(vector, np.float32)
            state.cache.set(keys[i], cached[i])
    return np.stack(cached).astype(np.float32)


async def embed_images(state: AppState, entry: ModelEntry, images: list[Image.Image]) -> np.ndarray:
    return np.stack(await entry.batchers["image"].submit_many(images)).astype(np.float32)


def image_states(entry: ModelEntry, images: list[Image.Image]) -> list[bytes | None]:
    """Text-independent per-image state a method needs for exact re-scoring (LAPS); None for the others."""
    if hasattr(entry.model, "image_state_bytes"):
        return list(entry.model.image_state_bytes(images))
    return [None] * len(images)


async def image_states_async(entry: ModelEntry, images: list[Image.Image]) -> list[bytes | None]:
    if not hasattr(entry.model, "image_state_bytes"):
        return [None] * len(images)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(entry.batchers["image"]._executor, image_states, entry, images)
