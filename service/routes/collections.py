"""Collections: create, list, describe, delete; add, list and delete items; bind another method."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from service.embedding import embed_texts, gallery_vectors_and_states_async
from service.errors import ApiError
from service.images import decode_base64
from service.registry import METHODS
from service.schemas import CollectionCreate, CollectionInfo, ErrorResponse, ItemOut, ItemsAdd, ItemsAdded
from service.state import AppState, get_state, image_from_bytes, require_api_key
from service.store import NewItem

router = APIRouter(prefix="/collections", tags=["collections"], dependencies=[Depends(require_api_key)],
                   responses={404: {"model": ErrorResponse}, 422: {"model": ErrorResponse}})


def image_url(collection: str, item: dict[str, Any]) -> str | None:
    return f"/collections/{collection}/items/{item['id']}/image" if item.get("image_file") else None


def item_out(collection: str, item: dict[str, Any]) -> ItemOut:
    return ItemOut(id=item["id"], key=item["key"], text=item.get("text"), metadata=item["metadata"],
                   width=item.get("width"), height=item.get("height"), image_url=image_url(collection, item))


@router.post("", status_code=201, response_model=CollectionInfo)
def create_collection(body: CollectionCreate, state: AppState = Depends(get_state)) -> dict[str, Any]:
    search_methods = sorted(m for m, (_, _, task) in METHODS.items() if task == "search")
    for method in body.methods:
        if method not in search_methods:
            raise ApiError(422, "unknown_method", f"{method!r} is not a search method {search_methods}")
    state.store.create(body.name, body.methods, body.description, body.kind)
    return state.store.stats(body.name)


@router.get("", response_model=list[CollectionInfo])
def list_collections(state: AppState = Depends(get_state)) -> list[dict[str, Any]]:
    return [state.store.stats(c.name) for c in state.store.list()]


@router.get("/{name}", response_model=CollectionInfo)
def describe_collection(name: str, state: AppState = Depends(get_state)) -> dict[str, Any]:
    return state.store.stats(name)


@router.delete("/{name}", status_code=204)
def delete_collection(name: str, state: AppState = Depends(get_state)) -> None:
    state.store.drop(name)


async def _items_from_request(request: Request, state: AppState) -> list[tuple[dict[str, Any], bytes | None]]:
    """(item fields, image bytes) pairs from JSON ``{"items": [...]}`` or multipart ``files`` + ``metadata``."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        files = [f for f in form.getlist("files") if not isinstance(f, str)]
        if not files:
            raise ApiError(422, "missing_files", "multipart uploads carry images in 'files' fields")
        raw_meta = form.get("metadata")
        try:
            metadata = json.loads(raw_meta) if isinstance(raw_meta, str) and raw_meta else {}
            keys = json.loads(form["keys"]) if isinstance(form.get("keys"), str) else None
        except ValueError as exc:
            raise ApiError(422, "invalid_metadata", "metadata and keys must be JSON") from exc
        if isinstance(metadata, list) and len(metadata) != len(files):
            raise ApiError(422, "invalid_metadata", "metadata list length differs from the number of files")
        if keys is not None and (not isinstance(keys, list) or len(keys) != len(files)):
            raise ApiError(422, "invalid_metadata", "keys must be a list with one key per file")
        out = []
        for n, upload in enumerate(files):
            meta = metadata[n] if isinstance(metadata, list) else dict(metadata)
            if not isinstance(meta, dict):
                raise ApiError(422, "invalid_metadata", "each metadata entry must be a JSON object")
            meta.setdefault("filename", upload.filename)
            out.append(({"metadata": meta, "key": keys[n] if keys else None}, await upload.read()))
        return out
    try:
        body = ItemsAdd.model_validate(await request.json())
    except ValueError as exc:
        errors = exc.errors() if hasattr(exc, "errors") else []
        raise ApiError(422, "invalid_request", f"invalid items body: {errors or exc}") from exc
    return [({"metadata": it.metadata, "key": it.key, "text": it.text},
             decode_base64(it.image_base64) if it.image_base64 else None) for it in body.items]


@router.post("/{name}/items", status_code=201, response_model=ItemsAdded,
             openapi_extra={"requestBody": {"content": {
                 "application/json": {"schema": ItemsAdd.model_json_schema()},
                 "multipart/form-data": {"schema": {"type": "object", "properties": {
                     "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                     "metadata": {"type": "string", "description": "JSON object, or list with one per file"},
                     "keys": {"type": "string", "description": "JSON list of item keys"}}}}}}})
async def add_items(name: str, request: Request, state: AppState = Depends(get_state)) -> dict[str, Any]:
    """Decode and check every image first: one bad image rejects the request and nothing is added."""
    collection = state.store.get(name)
    raw_items = await _items_from_request(request, state)
    if len(raw_items) > 512:
        raise ApiError(422, "too_many_items", "at most 512 items per request")
    new_items: list[NewItem] = []
    images = []
    texts = []
    for fields, data in raw_items:
        if collection.kind == "images":
            if data is None:
                raise ApiError(422, "missing_image", "items of an image collection need image_base64 or a file")
            image = image_from_bytes(state, data)
            images.append(image)
            fmt = (_format_of(data) or "bin")
            new_items.append(NewItem(data, fmt, image.width, image.height, fields["metadata"], fields["key"]))
        else:
            text = (fields.get("text") or "").strip()
            if not text:
                raise ApiError(422, "missing_text", "items of a text collection need a non-empty text")
            texts.append(text)
            new_items.append(NewItem(None, "", 0, 0, fields["metadata"], fields["key"], text=text))
    versions = {}
    for method in collection.methods:
        entry = state.registry.get(method, "search")
        versions[method] = entry.version
        if collection.kind == "images":
            vectors, states = await gallery_vectors_and_states_async(entry, images)
        else:
            vectors = await embed_texts(state, entry, texts)
            states = [None] * len(texts)
        for item, vector, blob in zip(new_items, vectors, states, strict=True):
            item.vectors[method] = vector
            if blob is not None:
                item.states[method] = blob
    ids = state.store.add_items(name, new_items, versions)
    return {"collection": name, "ids": ids, "index_version": state.store.get(name).change_counter}


def _format_of(data: bytes) -> str | None:
    signatures = {b"\x89PNG": "png", b"\xff\xd8": "jpg", b"GIF8": "gif", b"RIFF": "webp", b"BM": "bmp"}
    for magic, fmt in signatures.items():
        if data.startswith(magic):
            return fmt
    return None


@router.get("/{name}/items", response_model=list[ItemOut])
def list_items(name: str, offset: int = 0, limit: int = 100, state: AppState = Depends(get_state)) -> list[ItemOut]:
    if offset < 0 or not 1 <= limit <= 1000:
        raise ApiError(422, "invalid_request", "offset >= 0 and 1 <= limit <= 1000")
    return [item_out(name, item) for item in state.store.list_items(name, offset, limit)]


@router.delete("/{name}/items/{item_id}", status_code=204)
def delete_item(name: str, item_id: int, state: AppState = Depends(get_state)) -> None:
    state.store.delete_items(name, [item_id])


@router.get("/{name}/items/{item_id}/image")
def item_image(name: str, item_id: int, state: AppState = Depends(get_state)) -> FileResponse:
    return FileResponse(state.store.image_path(name, item_id))


class MethodsBind(BaseModel):
    methods: list[str] = Field(..., min_length=1)


@router.post("/{name}/methods", response_model=CollectionInfo)
async def bind_methods(name: str, body: MethodsBind, state: AppState = Depends(get_state)) -> dict[str, Any]:
    """Index an existing gallery with more methods (e.g. IVT beside IRRA), from the stored images."""
    collection = state.store.get(name)
    entries = {m: state.registry.get(m, "search") for m in body.methods}
    state.store.add_methods(name, body.methods)
    for method, entry in entries.items():
        if method in collection.methods:
            continue
        missing = state.store.missing_embeddings(name, method)
        for start in range(0, len(missing), 64):
            chunk = missing[start:start + 64]
            found = state.store.items(name, chunk)
            if collection.kind == "images":
                images = [image_from_bytes(state, (state.store.data_dir / found[i]["image_file"]).read_bytes())
                          for i in chunk]
                vectors, states = await gallery_vectors_and_states_async(entry, images)
            else:
                vectors = await embed_texts(state, entry, [found[i]["text"] for i in chunk])
                states = None
            state.store.put_embeddings(name, method, entry.version, chunk, vectors, states)
    return state.store.stats(name)
