"""Request and response models: the contract users see (also rendered at /docs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator


class ErrorBody(BaseModel):
    code: str
    message: str
    details: dict[str, Any] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class CollectionCreate(BaseModel):
    name: str = Field(..., examples=["people"])
    methods: list[str] = Field(..., min_length=1, examples=[["irra", "ivt"]])
    kind: Literal["images", "texts"] = "images"
    description: str = ""


class CollectionInfo(BaseModel):
    name: str
    kind: str
    methods: list[str]
    description: str
    items: int
    created_at: float
    index_version: int
    indexes: dict[str, Any]


class ItemIn(BaseModel):
    """One gallery item: an image (base64) for image collections, a text for text collections."""

    image_base64: str | None = None
    text: str | None = None
    key: str | None = Field(None, max_length=256, description="your own unique id, e.g. a file name")
    metadata: dict[str, Any] = Field(default_factory=dict, examples=[{"person_id": 12, "camera": 3}])


class ItemsAdd(BaseModel):
    items: list[ItemIn] = Field(..., min_length=1, max_length=512)


class ItemsAdded(BaseModel):
    collection: str
    ids: list[int]
    index_version: int


class ItemOut(BaseModel):
    id: int
    key: str | None
    text: str | None = None
    metadata: dict[str, Any]
    width: int | None = None
    height: int | None = None
    image_url: str | None = None


class SearchRequest(BaseModel):
    collection: str
    method: str = Field(..., examples=["irra"])
    query: str | None = Field(None, description="text query (text -> image search)")
    image_base64: str | None = Field(None, description="image query (image -> text search, LAPS)")
    top_k: int = Field(10, ge=1, le=1000)
    candidates: int | None = Field(None, ge=1, le=20000, description="LAPS: candidates re-scored exactly (C)")

    @field_validator("query")
    @classmethod
    def _query_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("the query is empty")
        if value is not None and len(value) > 2000:
            raise ValueError("the query is longer than 2000 characters")
        return value


class SearchHit(BaseModel):
    rank: int
    id: int
    key: str | None
    score: float
    metadata: dict[str, Any]
    text: str | None = None
    image_url: str | None = None


class SearchResponse(BaseModel):
    collection: str
    method: str
    model_version: str
    index_version: int
    index_kind: str | None
    took_ms: float
    candidates_scored: int | None = None
    results: list[SearchHit]


class Box(BaseModel):
    xyxy: list[float]
    xywh: list[float]


class GroundingOut(BaseModel):
    expression: str
    box: Box
    per_scale_boxes: list[list[float]]
    kept_patches: list[int]
    total_patches: list[int]
    time_ms: float


class GroundResponse(BaseModel):
    method: str
    model_version: str
    image_size: list[int]
    results: list[GroundingOut]


class MaskOut(BaseModel):
    expression: str
    format: str
    size: list[int] = Field(..., description="[height, width] of the original image")
    rle: dict[str, Any] | None = None
    png_base64: str | None = None
    polygons: list[list[float]] | None = None
    bbox: list[float] = Field(..., description="xywh of the mask in original pixels; zeros when empty")
    area: int
    mean_probability: float


class SegmentResponse(BaseModel):
    method: str
    model_version: str
    image_size: list[int]
    threshold: float
    results: list[MaskOut]
