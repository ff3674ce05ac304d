"""Process-wide state (settings, collection store, models, cache) and the FastAPI dependencies over it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from PIL import Image

from service.cache import EmbeddingCache
from service.errors import ApiError
from service.images import decode_base64, open_image
from service.registry import ModelRegistry
from service.settings import Settings
from service.store import CollectionStore


@dataclass
class AppState:
    settings: Settings
    store: CollectionStore
    registry: ModelRegistry
    cache: EmbeddingCache


def get_state(request: Request) -> AppState:
    return request.app.state.vls


def require_api_key(request: Request) -> str:
    """When keys are configured: ``X-API-Key`` or ``Authorization: Bearer`` must hold one; rate-limited per key."""
    state: AppState = request.app.state.vls
    keys = state.settings.api_key_set()
    supplied = request.headers.get("x-api-key") or ""
    auth = request.headers.get("authorization", "")
    if not supplied and auth.lower().startswith("bearer "):
        supplied = auth[7:].strip()
    if keys and supplied not in keys:
        raise ApiError(401, "unauthorized", "a valid API key is required (X-API-Key header)")
    who = supplied or (request.client.host if request.client else "anonymous")
    if not state.cache.allow(who, state.settings.rate_limit_per_minute):
        raise ApiError(429, "rate_limited", "too many requests for this key; retry in a minute")
    return who


def image_from_bytes(state: AppState, data: bytes) -> Image.Image:
    return open_image(data, state.settings.max_upload_bytes, state.settings.max_image_pixels)


async def read_image_request(request: Request, state: AppState) -> tuple[Image.Image, bytes, dict[str, Any]]:
    """An image plus parameters, from multipart (``image`` file + form fields) or JSON (``image_base64`` or
    ``ref`` = {"collection", "id"}). Form fields that hold JSON lists (``expressions``) are decoded."""
    content_type = request.headers.get("content-type", "")
    params: dict[str, Any]
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "missing_image", "multipart requests need an 'image' file field")
        data = await upload.read()
        params = {}
        for key in form.keys():
            if key == "image":
                continue
            values = [v for v in form.getlist(key) if isinstance(v, str)]
            params[key] = values if key == "expressions" else values[-1]
        if isinstance(params.get("expressions"), list) and len(params["expressions"]) == 1:
            text = params["expressions"][0].strip()
            if text.startswith("["):
                try:
                    params["expressions"] = json.loads(text)
                except ValueError as exc:
                    raise ApiError(422, "invalid_request", "expressions is not a JSON list") from exc
    else:
        try:
            params = await request.json()
        except ValueError as exc:
            raise ApiError(422, "invalid_json", "the body is neither multipart nor valid JSON") from exc
        if not isinstance(params, dict):
            raise ApiError(422, "invalid_request", "the JSON body must be an object")
        if params.get("image_base64"):
            data = decode_base64(str(params["image_base64"]))
        elif isinstance(params.get("ref"), dict):
            ref = params["ref"]
            try:
                path = state.store.image_path(str(ref["collection"]), int(ref["id"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise ApiError(422, "invalid_ref", "ref needs 'collection' and an integer 'id'") from exc
            data = path.read_bytes()
        else:
            raise ApiError(422, "missing_image", "send image_base64, a ref, or a multipart 'image' file")
    return image_from_bytes(state, data), data, params


def expressions_from(params: dict[str, Any], limit: int = 16) -> list[str]:
    raw = params.get("expressions", params.get("expression"))
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise ApiError(422, "missing_expression", "give 'expressions' (a list) or 'expression'")
    if len(raw) > limit:
        raise ApiError(422, "too_many_expressions", f"at most {limit} expressions per request")
    texts = []
    for text in raw:
        if not isinstance(text, str) or not text.strip():
            raise ApiError(422, "empty_expression", "every expression must be a non-empty string")
        if len(text) > 1000:
            raise ApiError(422, "expression_too_long", "an expression is longer than 1000 characters")
        texts.append(text.strip())
    return texts
