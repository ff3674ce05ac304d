"""Encoding through the micro-batchers, with the shared text-embedding cache in front."""

from __future__ import annotations

import asyncio

import numpy as np
from PIL import Image

from service.cache import content_key
from service.registry import ModelEntry
from service.state import AppState


async def embed_texts(state: AppState, entry: ModelEntry, texts: list[str]) -> np.ndarray:
    # the precision is part of the key: bf16 and fp32 embeddings of one checkpoint are close, not equal
    version = f"{entry.version}@{getattr(entry.model, 'precision', '')}"
    keys = [content_key(entry.method, version, "text", t.encode("utf-8")) for t in texts]
    cached = [state.cache.get(k) for k in keys]
    todo = [i for i, v in enumerate(cached) if v is None]
    if todo:
        fresh = await entry.batchers["text"].submit_many([texts[i] for i in todo])
        for i, vector in zip(todo, fresh, strict=True):
            cached[i] = np.asarray(vector, np.float32)
            state.cache.set(keys[i], cached[i])
    return np.stack(cached).astype(np.float32)


async def embed_images(entry: ModelEntry, images: list[Image.Image]) -> np.ndarray:
    """Query images (no cache: images rarely repeat), through the micro-batcher."""
    return np.stack(await entry.batchers["image"].submit_many(images)).astype(np.float32)


def _vectors_and_states(entry: ModelEntry, images: list[Image.Image]) -> tuple[np.ndarray, list[bytes | None]]:
    if hasattr(entry.model, "encode_images_with_states"):  # LAPS: one backbone pass gives both
        vectors, states = entry.model.encode_images_with_states(images)
        return np.asarray(vectors, np.float32), list(states)
    return np.asarray(entry.model.encode_images(images), np.float32), [None] * len(images)


def gallery_vectors_and_states(entry: ModelEntry, images: list[Image.Image]) -> tuple[np.ndarray, list[bytes | None]]:
    """Index vectors plus the per-image state a method needs for exact re-scoring (LAPS); None for the others.
    Runs on the model's worker thread, so it never overlaps the micro-batched encodes."""
    return entry.batchers["image"].call_on_worker(_vectors_and_states, entry, images).result()


async def gallery_vectors_and_states_async(entry: ModelEntry,
                                           images: list[Image.Image]) -> tuple[np.ndarray, list[bytes | None]]:
    if not hasattr(entry.model, "encode_images_with_states"):
        return await embed_images(entry, images), [None] * len(images)
    return await asyncio.wrap_future(entry.batchers["image"].call_on_worker(_vectors_and_states, entry, images))
