"""POST /search: a text query against an image collection (or, for LAPS, an image against a text collection)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends

from service.embedding import embed_images, embed_texts
from service.errors import ApiError
from service.images import decode_base64
from service.routes.collections import image_url
from service.schemas import ErrorResponse, SearchRequest, SearchResponse
from service.state import AppState, get_state, image_from_bytes, require_api_key

router = APIRouter(tags=["search"], dependencies=[Depends(require_api_key)],
                   responses={404: {"model": ErrorResponse}, 422: {"model": ErrorResponse}})

DEFAULT_LAPS_CANDIDATES = 100


@router.post("/search", response_model=SearchResponse)
async def search(body: SearchRequest, state: AppState = Depends(get_state)) -> dict[str, Any]:
    start = time.perf_counter()
    collection = state.store.get(body.collection)
    entry = state.registry.get(body.method, "search")
    if body.method not in collection.methods:
        raise ApiError(422, "method_not_indexed",
                       f"collection {body.collection!r} is indexed for {collection.methods}, not {body.method!r}")
    if collection.kind == "images":
        if not body.query:
            raise ApiError(422, "missing_query", "searching an image collection needs a text 'query'")
        query_vector = await embed_texts(state, entry, [body.query])
    else:
        if not body.image_base64:
            raise ApiError(422, "missing_query", "searching a text collection needs an 'image_base64' query")
        query_image = image_from_bytes(state, decode_base64(body.image_base64))
        query_vector = await embed_images(entry, [query_image])

    exact = hasattr(entry.model, "exact_scores") and hasattr(entry.model, "state_from_bytes")
    fetch = max(body.candidates or DEFAULT_LAPS_CANDIDATES, body.top_k) if exact else body.top_k
    scores, ids = state.store.search(body.collection, body.method, query_vector, fetch)
    scores, ids = scores[0], ids[0]
    keep = ids >= 0
    scores, ids = scores[keep], ids[keep]
    scored = None
    if exact and len(ids):
        scores = _exact_rescore(state, entry, collection.kind, body, ids, query_image if collection.kind == "texts"
                                else None)
        order = np.argsort(-scores, kind="stable")
        scores, ids = scores[order], ids[order]
        scored = int(len(ids))
    scores, ids = scores[: body.top_k], ids[: body.top_k]
    found = state.store.items(body.collection, [int(i) for i in ids])
    index = state.store.index(body.collection, body.method)
    results = [
        {"rank": rank + 1, "id": int(i), "key": found[int(i)]["key"], "score": float(s),
         "metadata": found[int(i)]["metadata"], "text": found[int(i)]["text"],
         "image_url": image_url(body.collection, found[int(i)])}
        for rank, (s, i) in enumerate(zip(scores, ids, strict=True)) if int(i) in found
    ]
    return {"collection": body.collection, "method": body.method, "model_version": entry.version,
            "index_version": collection.change_counter, "index_kind": index.kind if index else None,
            "took_ms": round((time.perf_counter() - start) * 1000, 2), "candidates_scored": scored,
            "results": results}


def _exact_rescore(state: AppState, entry: Any, kind: str, body: SearchRequest, ids: np.ndarray,
                   query_image: Any) -> np.ndarray:
    """LAPS's second stage: the exact cross-modal score on the candidates (candidate images x the caption, or
    the query image x candidate captions), images from the per-item states stored at indexing time."""
    model = entry.model
    if kind == "images":
        blobs = state.store.states(body.collection, body.method, [int(i) for i in ids])
        missing = [int(i) for i in ids if blobs.get(int(i)) is None]
        if missing:
            raise ApiError(409, "state_missing", f"items {missing[:5]} have no stored {body.method} state; "
                                                 "re-add them or rebuild the collection")
        images = type(model.state_from_bytes(blobs[int(ids[0])])).cat(
            [model.state_from_bytes(blobs[int(i)]) for i in ids])
        return np.asarray(model.exact_scores(images, model.caption_states([body.query])), np.float32)[:, 0]
    found = state.store.items(body.collection, [int(i) for i in ids])
    captions = model.caption_states([found[int(i)]["text"] for i in ids])
    return np.asarray(model.exact_scores(model.image_states([query_image]), captions), np.float32)[0]
