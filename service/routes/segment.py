"""POST /segment: MagNet masks at the original image size, as COCO RLE (default), PNG or polygons."""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from PIL import Image
from pycocotools import mask as coco_mask

from service.errors import ApiError
from service.routes.ground import IMAGE_REQUEST_DOC
from service.schemas import ErrorResponse, SegmentResponse
from service.state import AppState, expressions_from, get_state, read_image_request, require_api_key

router = APIRouter(tags=["segmentation"], dependencies=[Depends(require_api_key)],
                   responses={415: {"model": ErrorResponse}, 422: {"model": ErrorResponse}})


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO RLE (column-major, compressed counts as text), decodable with ``pycocotools.mask.decode``."""
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def encode_png(mask: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def mask_polygons(mask: np.ndarray) -> list[list[float]]:
    """Outer contours as flat [x0, y0, x1, y1, ...] lists (COCO polygon layout), via OpenCV."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]


def mask_bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


@router.post("/segment", response_model=SegmentResponse, openapi_extra=IMAGE_REQUEST_DOC)
async def segment(request: Request, state: AppState = Depends(get_state)) -> dict[str, Any]:
    image, _, params = await read_image_request(request, state)
    expressions = expressions_from(params)
    fmt = str(params.get("format", "rle"))
    if fmt not in ("rle", "png", "polygon"):
        raise ApiError(422, "invalid_format", "format is one of rle, png, polygon")
    try:
        threshold = float(params.get("threshold", 0.5))
    except (TypeError, ValueError) as exc:
        raise ApiError(422, "invalid_threshold", "threshold must be a number") from exc
    if not 0.0 < threshold < 1.0:
        raise ApiError(422, "invalid_threshold", "threshold must lie strictly between 0 and 1")
    entry = state.registry.get(str(params.get("method", "magnet")), "segment")
    probabilities = await asyncio.to_thread(entry.model.segment, image, expressions)
    results = []
    for expression, prob in zip(expressions, probabilities, strict=True):
        prob = np.asarray(prob, np.float32)
        if prob.shape != (image.height, image.width):
            raise RuntimeError(f"segmenter returned {prob.shape}, expected {(image.height, image.width)}")
        mask = prob > threshold
        out: dict[str, Any] = {"expression": expression, "format": fmt, "size": [image.height, image.width],
                               "bbox": mask_bbox(mask), "area": int(mask.sum()),
                               "mean_probability": float(prob[mask].mean()) if mask.any() else 0.0}
        if fmt == "rle":
            out["rle"] = encode_rle(mask)
        elif fmt == "png":
            out["png_base64"] = encode_png(mask)
        else:
            out["polygons"] = mask_polygons(mask)
        results.append(out)
    return {"method": entry.method, "model_version": entry.version, "image_size": [image.width, image.height],
            "threshold": threshold, "results": results}
