"""The small surface every method module offers the service, so the service never knows a method's insides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image


@runtime_checkable
class RetrievalModel(Protocol):
    """A two-tower encoder (IRRA, IVT; LAPS for its candidate stage): both sides map into one space."""

    method: str
    version: str
    embed_dim: int

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        """[N, D] float32, L2-normalised."""
        ...

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """[N, D] float32, L2-normalised."""
        ...


@dataclass
class GroundingResult:
    """A box for one referring expression, in original-image pixels."""

    box_xyxy: list[float]
    per_scale_boxes: list[list[float]] = field(default_factory=list)
    kept_patches: list[int] = field(default_factory=list)
    total_patches: list[int] = field(default_factory=list)
    time_ms: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class GroundingModel(Protocol):
    method: str
    version: str

    def ground(self, image: Image.Image, expressions: list[str]) -> list[Any]: ...


@runtime_checkable
class SegmentationModel(Protocol):
    method: str
    version: str

    def segment(self, image: Image.Image, expressions: list[str]) -> list[np.ndarray]:
        """Foreground probability maps [H, W] float32 at the original image size, one per expression."""
        ...
