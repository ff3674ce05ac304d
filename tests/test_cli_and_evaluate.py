"""The collection CLI and the person evaluation CLI on a synthetic CUHK-PEDES-format dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.irra import IRRARetrievalModel
from service.cli import build_collection, folder_records, split_records
from service.registry import ModelRegistry
from service.settings import Settings
from service.store import CollectionStore
from tests.test_api_search import SMALL_IRRA
from training import evaluate
from training.person_metrics import rank
from training.synthetic import generate_person


@pytest.fixture(scope="module")
def person_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("person")
    generate_person(root, seed=3, size="tiny", progress=False)
    return root


def test_build_collection_from_split_and_folder(person_root: Path, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", methods="", warmup=False)
    registry = ModelRegistry(settings)
    model = IRRARetrievalModel.from_config(SMALL_IRRA, seed=0)
    registry.register("irra", model)
    store = CollectionStore(settings.data_dir)
    records = list(split_records(person_root, "CUHK-PEDES", "test"))
    assert records and all(r["metadata"]["person_id"] >= 1 for r in records)
    assert build_collection(store, registry, "cuhk-test", ["irra"], records, batch_size=4, progress=False) \
        == len(records)
    # building again adds nothing: items are keyed by their relative path
    assert build_collection(store, registry, "cuhk-test", ["irra"], records, progress=False) == 0
    folder = list(folder_records(person_root / "CUHK-PEDES" / "imgs"))
    assert len(folder) == len(json.loads((person_root / "CUHK-PEDES" / "reid_raw.json").read_text()))
    stats = store.stats("cuhk-test")
    assert stats["items"] == len(records) and stats["indexes"]["irra"]["embedded_items"] == len(records)
    query = model.encode_texts([records[0]["metadata"]["captions"][0]])
    _, ids = store.search("cuhk-test", "irra", query, 3)
    assert len(ids[0]) == 3 and (ids[0] >= 0).all()
    registry.close()
    store.close()


def test_person_evaluation_matches_direct_rank(person_root: Path) -> None:
    model = IRRARetrievalModel.from_config(SMALL_IRRA, seed=0)
    parsed = type("Args", (), {"root": person_root, "dataset": "CUHK-PEDES", "split": "test", "method": "irra",
                               "batch_size": 4, "ivt_official": False})()
    metrics = evaluate.evaluate_person(parsed, model)
    from training.datasets import read_image, read_person_annotations

    split = read_person_annotations(person_root, "CUHK-PEDES").test
    images = model.encode_images([read_image(p) for p in split.image_paths])
    texts = model.encode_texts(split.captions)
    direct = rank(texts @ images.T, np.asarray(split.caption_pids), np.asarray(split.image_pids)).as_dict()
    assert metrics == pytest.approx(direct)
    assert 0.0 <= metrics["R1"] <= 100.0 and "mINP" in metrics
