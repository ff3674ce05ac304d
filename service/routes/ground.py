"""POST /ground: ScanFormer boxes for referring expressions, in original-image pixels."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request

from service.schemas import ErrorResponse, GroundResponse
from service.state import AppState, expressions_from, get_state, read_image_request, require_api_key

router = APIRouter(tags=["grounding"], dependencies=[Depends(require_api_key)],
                   responses={415: {"model": ErrorResponse}, 422: {"model": ErrorResponse}})

IMAGE_REQUEST_DOC = {"requestBody": {"content": {
    "application/json": {"schema": {"type": "object", "properties": {
        "image_base64": {"type": "string"},
        "ref": {"type": "object", "properties": {"collection": {"type": "string"}, "id": {"type": "integer"}}},
        "expressions": {"type": "array", "items": {"type": "string"}},
        "method": {"type": "string"}, "threshold": {"type": "number"},
        "format": {"type": "string", "enum": ["rle", "png", "polygon"]}}}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "image": {"type": "string", "format": "binary"},
        "expressions": {"type": "array", "items": {"type": "string"}},
        "threshold": {"type": "number"}, "format": {"type": "string"}}}}}}}


def _result(expression: str, item: Any) -> dict[str, Any]:
    data = item if isinstance(item, dict) else vars(item)
    x0, y0, x1, y1 = (float(v) for v in data.get("box_xyxy") or data["xyxy"])
    return {"expression": expression, "box": {"xyxy": [x0, y0, x1, y1], "xywh": [x0, y0, x1 - x0, y1 - y0]},
            "per_scale_boxes": [list(map(float, b)) for b in data.get("per_scale_boxes", [])],
            "kept_patches": [int(k) for k in data.get("kept_patches", [])],
            "total_patches": [int(k) for k in data.get("total_patches", [])],
            "time_ms": float(data.get("time_ms", 0.0))}


@router.post("/ground", response_model=GroundResponse, openapi_extra=IMAGE_REQUEST_DOC)
async def ground(request: Request, state: AppState = Depends(get_state)) -> dict[str, Any]:
    image, _, params = await read_image_request(request, state)
    expressions = expressions_from(params)
    entry = state.registry.get(str(params.get("method", "scanformer")), "ground")
    outputs = await asyncio.to_thread(entry.model.ground, image, expressions)
    return {"method": entry.method, "model_version": entry.version, "image_size": [image.width, image.height],
            "results": [_result(e, o) for e, o in zip(expressions, outputs, strict=True)]}
