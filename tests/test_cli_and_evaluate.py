"""The collection CLI and the evaluation CLI (person retrieval; boxes and masks with their per-cue breakdown) on
synthetic data in the official formats."""

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
from training.recipes import get_recipe
from training.synthetic import (
    DESCRIPTOR_SETS,
    LOCATION_PHRASES,
    OBJECT_SIZES,
    SHAPE_COLOURS,
    SHAPES,
    ShapeObject,
    generate_person,
    generate_refer,
    render_expression,
)


@pytest.fixture(scope="module")
def person_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("person")
    generate_person(root, seed=3, size="tiny", progress=False)
    return root


@pytest.fixture(scope="module")
def refer_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("refer")
    generate_refer(root, seed=3, size="small", progress=False)
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


def test_expression_cue_names_the_cue_each_generated_expression_uses() -> None:
    """``evaluate.expression_cue`` on expressions rendered by the generator from known attributes: a location
    phrase wins, then a colour word, then a size word, else the shape alone ("other")."""
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(600):
        target = ShapeObject(shape=str(rng.choice(SHAPES)), colour=str(rng.choice(list(SHAPE_COLOURS))),
                             size=str(rng.choice(OBJECT_SIZES)), cx=0.0, cy=0.0, radius=1.0)
        attrs = DESCRIPTOR_SETS[int(rng.integers(len(DESCRIPTOR_SETS)))]
        location = [None, *LOCATION_PHRASES][int(rng.integers(len(LOCATION_PHRASES) + 1))]
        text = render_expression(target, attrs, location, rng)
        expected = ("location" if location else "colour" if "colour" in attrs else "size" if "size" in attrs
                    else "other")
        assert evaluate.expression_cue(text) == expected, text
        seen.add(expected)
    assert seen == set(evaluate.EXPRESSION_CUES)


class ScriptedGrounder:
    """Answers the images of a refer split in ``evaluate_boxes``' order with a given box per sentence; with
    ``coarse`` boxes too, ScanFormer's ``per_scale_boxes`` are (coarse box, answer)."""

    def __init__(self, boxes: list[list[np.ndarray]], coarse: list[list[np.ndarray]] | None = None) -> None:
        self.boxes = iter(boxes)
        self.coarse = iter(coarse) if coarse is not None else None

    def ground(self, image: object, texts: list[str]) -> list[dict]:
        boxes = next(self.boxes)
        assert len(boxes) == len(texts)
        if self.coarse is None:
            return [{"box_xyxy": box.tolist()} for box in boxes]
        return [{"box_xyxy": box.tolist(), "per_scale_boxes": [coarse.tolist(), box.tolist()]}
                for box, coarse in zip(boxes, next(self.coarse), strict=True)]


def test_box_evaluation_by_cue_adds_up_to_the_whole_split(refer_root: Path) -> None:
    from training.datasets import read_refer

    refer = read_refer(refer_root, "refsynth", "unc")
    sentences = evaluate._refer_sentences(refer, "test")
    truth = [[refer.ref_box_xyxy(ref) for ref, _ in items] for items in sentences.values()]
    perfect = evaluate.evaluate_boxes(ScriptedGrounder(truth), refer_root, split="test", by_cue=True)
    cues = [c for c in evaluate.EXPRESSION_CUES if f"sentences {c}" in perfect]
    assert len(cues) >= 3 and sum(perfect[f"sentences {c}"] for c in cues) == perfect["sentences"]
    assert perfect["Acc@0.5"] == 100.0 and all(perfect[f"Acc@0.5 {c}"] == 100.0 for c in cues)
    chance = sum(perfect[f"chance_Acc@0.5 {c}"] * perfect[f"sentences {c}"] for c in cues) / perfect["sentences"]
    assert chance == pytest.approx(perfect["chance_Acc@0.5"])
    # the first object of each image for every sentence: right exactly where that object is the referent
    first = [[refer.ref_box_xyxy(items[0][0])] * len(items) for items in sentences.values()]
    picked = evaluate.evaluate_boxes(ScriptedGrounder(first), refer_root, split="test", by_cue=True)
    assert 0.0 < picked["Acc@0.5"] < 100.0
    weighted = sum(picked[f"Acc@0.5 {c}"] * picked[f"sentences {c}"] for c in cues) / picked["sentences"]
    assert weighted == pytest.approx(picked["Acc@0.5"])
    plain = evaluate.evaluate_boxes(ScriptedGrounder(first), refer_root, split="test")
    assert plain == {k: v for k, v in picked.items() if k in plain} and "sentences other" not in plain


def test_mask_evaluation_by_cue_is_a_partition_of_the_sentences(refer_root: Path) -> None:
    from models.magnet import MagNetSegmenter

    recipe = get_recipe("magnet")
    segmenter = MagNetSegmenter.from_config(recipe.model_config(recipe.config("tiny")))
    metrics = evaluate.evaluate_masks(segmenter, refer_root, split="test", by_cue=True)
    cues = [c for c in evaluate.EXPRESSION_CUES if f"sentences {c}" in metrics]
    assert sum(metrics[f"sentences {c}"] for c in cues) == metrics["sentences"]
    for name in ("mIoU", "chance_mIoU"):
        weighted = sum(metrics[f"{name} {c}"] * metrics[f"sentences {c}"] for c in cues) / metrics["sentences"]
        assert weighted == pytest.approx(metrics[name])
    lines = []
    evaluate.print_cue_table({"magnet": metrics}, write=lines.append)
    assert lines[2].startswith("| magnet | mIoU | ") and lines[2].count("sentences") == len(cues)


def test_box_evaluation_per_scale_scores_each_scales_box(refer_root: Path) -> None:
    """``per_scale``: one Acc@0.5 per scale's box; the last scale's is the answer's."""
    from training.datasets import read_refer

    refer = read_refer(refer_root, "refsynth", "unc")
    sentences = evaluate._refer_sentences(refer, "test")
    truth = [[refer.ref_box_xyxy(ref) for ref, _ in items] for items in sentences.values()]
    first = [[refer.ref_box_xyxy(items[0][0])] * len(items) for items in sentences.values()]
    refined = evaluate.evaluate_boxes(ScriptedGrounder(truth, coarse=first), refer_root, split="test",
                                      per_scale=True)
    picked = evaluate.evaluate_boxes(ScriptedGrounder(first), refer_root, split="test")
    assert refined["Acc@0.5 scale1"] == refined["Acc@0.5"] == 100.0
    assert refined["Acc@0.5 scale0"] == pytest.approx(picked["Acc@0.5"]) and picked["Acc@0.5"] < 100.0
    coarsened = evaluate.evaluate_boxes(ScriptedGrounder(first, coarse=truth), refer_root, split="test",
                                        per_scale=True)
    assert coarsened["Acc@0.5 scale0"] == 100.0 and coarsened["Acc@0.5 scale1"] == coarsened["Acc@0.5"] < 100.0
    assert "Acc@0.5 scale0" not in picked


def test_box_evaluation_by_outcome_tells_misses_apart(refer_root: Path) -> None:
    """``by_outcome``: a miss inside the referent is ``imprecise``, another object's box ``other object``, a box off
    the image ``elsewhere``; the shares add up to 100 overall and per cue, and ``hit`` is Acc@0.5."""
    from training.datasets import read_refer

    refer = read_refer(refer_root, "refsynth", "unc")
    sentences = evaluate._refer_sentences(refer, "test")

    def boxes(make: object) -> list[list[np.ndarray]]:
        return [[make(refer.ref_box_xyxy(ref), items) for ref, _ in items] for items in sentences.values()]

    def shrunk(box: np.ndarray, _: object) -> np.ndarray:  # a third of the side around the centre: IoU 1/9
        centre, half = (box[:2] + box[2:]) / 2, (box[2:] - box[:2]) / 6
        return np.concatenate([centre - half, centre + half])

    runs = {
        "imprecise": boxes(shrunk),
        "elsewhere": boxes(lambda box, _: np.array([-20.0, -20.0, -10.0, -10.0])),
        "first": boxes(lambda box, items: refer.ref_box_xyxy(items[0][0])),
    }
    for name in ("imprecise", "elsewhere"):
        metrics = evaluate.evaluate_boxes(ScriptedGrounder(runs[name]), refer_root, split="test", by_outcome=True)
        assert metrics[f"outcome {name}"] == 100.0 and metrics["Acc@0.5"] == 0.0
    picked = evaluate.evaluate_boxes(ScriptedGrounder(runs["first"]), refer_root, split="test", by_cue=True,
                                     by_outcome=True)
    assert 0.0 < picked["outcome hit"] == picked["Acc@0.5"] < 100.0
    assert picked["outcome other object"] == pytest.approx(100.0 - picked["Acc@0.5"])
    cues = [c for c in evaluate.EXPRESSION_CUES if f"sentences {c}" in picked]
    for cue in cues:
        assert sum(picked[f"outcome {o} {cue}"] for o in evaluate.BOX_OUTCOMES) == pytest.approx(100.0)
        assert picked[f"outcome hit {cue}"] == pytest.approx(picked[f"Acc@0.5 {cue}"])
    assert not any(k.startswith("outcome") for k in evaluate.evaluate_boxes(
        ScriptedGrounder(runs["first"]), refer_root, split="test"))


def test_refer_ceiling_reading_every_word_finds_every_referent(refer_root: Path) -> None:
    """The generator gives every referent a unique description, so reading every word scores 100; ignoring words
    can only lower the figure, and ignoring every attribute leaves only the location words."""
    from training.refer_ceiling import ceiling, read_expression

    full = ceiling(refer_root)
    shape_blind = ceiling(refer_root, blind=["shape"])
    attribute_blind = ceiling(refer_root, blind=["shape", "colour", "size"])
    assert full["ceiling"] == 100.0 and full["sentences"] == shape_blind["sentences"] > 0
    assert attribute_blind["ceiling"] <= shape_blind["ceiling"] <= 100.0 and attribute_blind["ceiling"] < 100.0
    objects = [{"id": 1, "bbox": [0, 0, 10, 10], "attributes": {"colour": "red", "size": "small", "shape": "star"}},
               {"id": 2, "bbox": [50, 0, 10, 10], "attributes": {"colour": "red", "size": "large", "shape": "star"}},
               {"id": 3, "bbox": [90, 0, 10, 10], "attributes": {"colour": "blue", "size": "large", "shape": "circle"}}]
    assert [o["id"] for o in read_expression("the star on the right", objects)] == [2]
    assert [o["id"] for o in read_expression("the star on the right", objects, blind=["shape"])] == [3]
    assert [o["id"] for o in read_expression("big red star", objects, blind=["size"])] == [1, 2]
    assert [o["id"] for o in read_expression("the star in the middle", objects, blind=["shape"])] == [2]
