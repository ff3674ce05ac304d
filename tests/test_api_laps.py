"""/search with method=laps, both directions: index candidates, then the exact LAPS score re-ranks them."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from models.laps import LapsSearchModel
from tests.conftest import b64, png_bytes
from tests.test_laps import SMALL_VIT


@pytest.fixture(scope="module")
def laps_model() -> LapsSearchModel:
    return LapsSearchModel.from_config(SMALL_VIT, seed=0)


def images(n: int) -> list[bytes]:
    rng = np.random.default_rng(5)
    return [png_bytes(tuple(int(c) for c in rng.integers(0, 255, 3)), size=(96, 96), stripe=int(rng.integers(0, 80)))
            for _ in range(n)]


def test_text_to_image_laps_is_exact_on_candidates(app_factory, laps_model) -> None:
    client = app_factory({"laps": laps_model})
    assert client.post("/collections", json={"name": "scenes", "methods": ["laps"]}).status_code == 201
    data = images(10)
    added = client.post("/collections/scenes/items", json={"items": [{"image_base64": b64(d)} for d in data]})
    ids = added.json()["ids"]
    query = "a red square on a grey table"
    body = client.post("/search", json={"collection": "scenes", "method": "laps", "query": query, "top_k": 5,
                                        "candidates": 10}).json()
    pil = [Image.open(io.BytesIO(d)).convert("RGB") for d in data]
    exact = laps_model.exact_scores(laps_model.image_states(pil), laps_model.caption_states([query]))[:, 0]
    order = np.argsort(-exact, kind="stable")[:5]
    assert [r["id"] for r in body["results"]] == [ids[i] for i in order]
    assert [r["score"] for r in body["results"]] == pytest.approx(exact[order].tolist(), abs=1e-5)
    assert body["candidates_scored"] == 10
    # with fewer candidates only those are scored, and the answer is still made of exact scores
    few = client.post("/search", json={"collection": "scenes", "method": "laps", "query": query, "top_k": 3,
                                       "candidates": 4}).json()
    assert few["candidates_scored"] == 4 and len(few["results"]) == 3
    by_id = dict(zip(ids, exact.tolist(), strict=True))
    assert all(r["score"] == pytest.approx(by_id[r["id"]], abs=1e-5) for r in few["results"])


def test_image_to_text_laps(app_factory, laps_model) -> None:
    client = app_factory({"laps": laps_model})
    created = client.post("/collections", json={"name": "caps", "methods": ["laps"], "kind": "texts"})
    assert created.status_code == 201
    captions = ["a red square", "two blue circles on white", "a green triangle at the top", "a dog", "an empty room"]
    ids = client.post("/collections/caps/items", json={"items": [{"text": c} for c in captions]}).json()["ids"]
    query = images(1)[0]
    body = client.post("/search", json={"collection": "caps", "method": "laps", "image_base64": b64(query),
                                        "top_k": 5}).json()
    pil = Image.open(io.BytesIO(query)).convert("RGB")
    exact = laps_model.exact_scores(laps_model.image_states([pil]), laps_model.caption_states(captions))[0]
    order = np.argsort(-exact, kind="stable")
    assert [r["id"] for r in body["results"]] == [ids[i] for i in order]
    assert [r["text"] for r in body["results"]] == [captions[i] for i in order]
    missing = client.post("/search", json={"collection": "caps", "method": "laps", "query": "x"})
    assert missing.status_code == 422 and missing.json()["error"]["code"] == "missing_query"
