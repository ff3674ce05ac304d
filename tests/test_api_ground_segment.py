"""/ground (ScanFormer) and /segment (MagNet) end to end with small freshly initialised models."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from models.magnet import MagNetSegmenter
from models.scanformer import ScanFormerConfig, ScanFormerGrounder
from tests.conftest import b64
from tests.test_magnet import SMALL as SMALL_MAGNET


def scene_png(width: int = 150, height: int = 100) -> bytes:
    array = np.full((height, width, 3), 200, np.uint8)
    array[20:60, 10:50] = (220, 30, 30)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def models() -> dict[str, object]:
    return {"scanformer": ScanFormerGrounder.from_config(ScanFormerConfig.small(), seed=0),
            "magnet": MagNetSegmenter.from_config(SMALL_MAGNET)}


def test_ground_multipart_and_json(app_factory, models) -> None:
    client = app_factory(models)
    data = scene_png()
    multipart = client.post("/ground", files={"image": ("s.png", data, "image/png")},
                            data={"expressions": ["the red square", "the grey background"]})
    assert multipart.status_code == 200, multipart.text
    body = multipart.json()
    assert body["image_size"] == [150, 100] and len(body["results"]) == 2
    for result in body["results"]:
        x0, y0, x1, y1 = result["box"]["xyxy"]
        assert 0 <= x0 <= x1 <= 150 and 0 <= y0 <= y1 <= 100
        assert result["box"]["xywh"] == pytest.approx([x0, y0, x1 - x0, y1 - y0])
        assert len(result["per_scale_boxes"]) == len(result["kept_patches"]) == len(result["total_patches"])
        assert result["kept_patches"][0] == result["total_patches"][0]  # the coarsest scale keeps every patch
    as_json = client.post("/ground", json={"image_base64": b64(data), "expressions": ["the red square"]})
    assert as_json.status_code == 200
    assert as_json.json()["results"][0]["box"] == body["results"][0]["box"]


def test_segment_rle_decodes_to_original_size(app_factory, models) -> None:
    client = app_factory(models)
    response = client.post("/segment", files={"image": ("s.png", scene_png(), "image/png")},
                           data={"expressions": "the red square", "threshold": "0.5"})
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    rle = {"size": result["rle"]["size"], "counts": result["rle"]["counts"].encode()}
    mask = coco_mask.decode(rle)
    assert mask.shape == (100, 150)
    assert int(mask.sum()) == result["area"]
    expected = models["magnet"].segment(Image.open(io.BytesIO(scene_png())).convert("RGB"), ["the red square"])[0]
    assert np.array_equal(mask.astype(bool), expected > 0.5)
    for fmt in ("png", "polygon"):
        other = client.post("/segment", json={"image_base64": b64(scene_png()), "expressions": ["the red square"],
                                              "format": fmt})
        assert other.status_code == 200, other.text
        out = other.json()["results"][0]
        if fmt == "png":
            decoded = np.array(Image.open(io.BytesIO(base64.b64decode(out["png_base64"])))) > 0
            assert np.array_equal(decoded, mask.astype(bool))
        else:
            assert isinstance(out["polygons"], list) and out["rle"] is None
            assert bool(out["polygons"]) == bool(result["area"])


@pytest.mark.parametrize("path", ["/ground", "/segment"])
def test_bad_input_is_4xx_json(app_factory, models, path: str) -> None:
    client = app_factory(models, max_image_pixels=100 * 100)

    def code(response, status: int) -> str:
        assert response.status_code == status, response.text
        return response.json()["error"]["code"]

    small = scene_png(80, 60)
    assert code(client.post(path, files={"image": ("x.png", b"not an image", "image/png")},
                            data={"expressions": "x"}), 415) == "invalid_image"
    assert code(client.post(path, json={"image_base64": b64(small), "expressions": ["  "]}), 422) \
        == "empty_expression"
    assert code(client.post(path, json={"image_base64": b64(small), "expressions": []}), 422) \
        == "missing_expression"
    assert code(client.post(path, json={"image_base64": b64(scene_png(150, 100)), "expressions": ["x"]}), 413) \
        == "image_too_large"
    assert code(client.post(path, json={"image_base64": "%%%", "expressions": ["x"]}), 422) == "invalid_base64"
    assert code(client.post(path, json={"expressions": ["x"]}), 422) == "missing_image"
    assert code(client.post(path, content=b"garbage", headers={"content-type": "application/json"}), 422) \
        == "invalid_json"
    if path == "/segment":
        assert code(client.post(path, json={"image_base64": b64(small), "expressions": ["x"], "threshold": 2}),
                    422) == "invalid_threshold"
        assert code(client.post(path, json={"image_base64": b64(small), "expressions": ["x"], "format": "gif"}),
                    422) == "invalid_format"
