"""Turning uploaded bytes into a checked RGB image: bad or truncated files are 415, oversized ones 413."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, UnidentifiedImageError

from models.image_io import truncated_images
from service.errors import ApiError


def decode_base64(data: str) -> bytes:
    if "," in data[:100] and data.startswith("data:"):
        data = data.split(",", 1)[1]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(422, "invalid_base64", "image_base64 is not valid base64") from exc


def open_image(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode fully (so truncation is caught now, not later) and convert to RGB."""
    if not data:
        raise ApiError(415, "invalid_image", "the image is empty")
    if len(data) > max_bytes:
        raise ApiError(413, "image_too_large", f"the image is {len(data)} bytes; the limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ApiError(413, "image_too_large",
                               f"the image has {width}x{height} pixels; the limit is {max_pixels} pixels")
            with truncated_images(False):  # refuse truncated uploads whatever else the process set
                image.load()
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise ApiError(415, "invalid_image", f"the upload is not a readable image: {exc}") from exc
    if width < 1 or height < 1:
        raise ApiError(415, "invalid_image", "the image has no pixels")
    return image.convert("RGB")
