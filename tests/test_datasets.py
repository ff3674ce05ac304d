"""Readers of the official formats (on generated data and on small hand-written official-schema files), the
per-method augmentation factories and the official text-corruption helpers."""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from training import datasets as D
from training import synthetic


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    out = tmp_path_factory.mktemp("synthetic")
    return out, synthetic.generate(out, "all", seed=21, size="small", progress=False)


def _png(path: Path, size: tuple[int, int] = (16, 40), colour: tuple[int, int, int] = (10, 200, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _fake_tokenize(text: str, length: int = 16) -> torch.Tensor:
    """Stand-in for a CLIP tokenizer: [SOT] word ids [EOT], zero-padded (ids < 49405)."""
    ids = [49406] + [1 + (sum(map(ord, w)) % 4000) for w in text.lower().split()][: length - 2] + [49407]
    return torch.tensor(ids + [0] * (length - len(ids)), dtype=torch.long)


# ==========================================================================================================
# readers on generated data


def test_generated_refer_data_reads_back(generated) -> None:
    out, manifests = generated
    refer = D.read_refer(out / "refer", synthetic.REFER_DATASET_NAME, "unc")
    assert {s: len(refer.ref_ids(s)) for s in ("train", "val", "test")} == manifests["refer"][
        "refs_per_split"
    ]
    dataset = D.ReferDataset(refer, "val", unit="sentence", tokenize=str.split)
    assert len(dataset) == sum(len(refer.refs_by_id[r]["sentences"]) for r in refer.ref_ids("val"))
    for index in range(0, len(dataset), 7):
        sample = dataset[index]
        height, width = sample["orig_size"]
        assert sample["image"].size == (width, height) and sample["mask"].shape == (height, width)
        ys, xs = np.nonzero(sample["mask"])
        x1, y1, x2, y2 = sample["box_xyxy"]
        assert (
            len(xs) > 0
            and xs.min() >= x1 - 1
            and xs.max() <= x2 + 1
            and ys.min() >= y1 - 1
            and ys.max() <= y2 + 1
        )
        assert sample["tokens"] == sample["text"].split()
    per_ref = D.ReferDataset(refer, "train", unit="ref")
    assert len(per_ref) == len(refer.ref_ids("train"))
    torch.manual_seed(0)
    texts = {per_ref[i]["text"] for i in range(3) for _ in range(12)}
    assert len(texts) > 3  # a random sentence per draw


def test_generated_person_data_reads_back(generated) -> None:
    out, _ = generated
    n_train, n_val, n_test = synthetic.SIZE_PRESETS["small"].person_identities
    views = synthetic.SIZE_PRESETS["small"].person_views
    data = D.read_person_annotations(out / "person", "CUHK-PEDES")
    assert data.num_classes == n_train
    assert sorted({c.pid for c in data.train}) == list(range(n_train))
    assert len(data.train) == n_train * views * 2
    assert len(data.val.image_paths) == n_val * views and len(data.val.captions) == 2 * n_val * views
    assert len(set(data.test.image_pids)) == n_test and min(data.test.image_pids) > n_train + n_val
    caption_level = D.read_person_caption_level(out / "person", "CUHK-PEDES")
    assert [c.pid for c in caption_level["train"]] == [c.pid for c in data.train]
    gallery = caption_level["test"][::2]  # IVT's gallery rule picks every image once
    assert [c.image_path for c in gallery] == data.test.image_paths

    dataset = D.PersonTrainDataset(data.train, D.irra_train_transform(), tokenize=_fake_tokenize,
                                   mlm=lambda ids: D.irra_mlm_mask(ids, random.Random(0)))
    batch = next(iter(DataLoader(dataset, batch_size=4, shuffle=False)))
    assert batch["image"].shape == (4, 3, 384, 128)
    assert batch["caption_ids"].shape == (4, 16) and torch.equal(batch["caption_ids"], batch["mlm_ids"])
    assert (batch["mlm_labels"] > 0).any()
    ivt = D.PersonTrainDataset(caption_level["train"], D.ivt_train_transform(), num_views=3)
    assert [v.shape for v in ivt[0]["images"]] == [(3, 384, 128)] * 3


def test_generated_caption_data_reads_back(generated) -> None:
    out, _ = generated
    data_dir, image_root = out / "caption" / synthetic.CAPTION_DATASET_NAME, out / "caption" / "images"
    train = D.read_karpathy_split(data_dir, "train")
    test = D.read_karpathy_split(data_dir, "test")
    assert train.im_div == 5 and test.im_div == 1
    assert train.unique_image_ids() == train.image_ids and test.unique_image_ids() == test.image_ids[::5]
    dataset = D.KarpathyCaptionDataset(train, image_root, D.laps_train_transform(), tokenize=len)
    sample = dataset[12]
    assert sample["img_index"] == 2 and sample["image_id"] == train.image_ids[2]
    assert sample["image"].shape == (3, 224, 224) and sample["tokens"] == len(sample["caption"])
    images = D.ImageListDataset([train.image_path(image_root, i) for i in train.unique_image_ids()],
                                train.unique_image_ids(), D.laps_test_transform())
    assert images[1]["image"].shape == (3, 224, 224) and images[1]["label"] == train.image_ids[1]


# ==========================================================================================================
# readers on hand-written official-schema files


def test_cuhk_pedes_splits_and_irra_pids(tmp_path: Path) -> None:
    base = tmp_path / "CUHK-PEDES"
    records = [
        {
            "split": "train",
            "captions": ["a man in red.", "red shirt man."],
            "file_path": "CUHK01/0001.png",
            "processed_tokens": [["a", "man", "in", "red"], ["red", "shirt", "man"]],
            "id": 1,
        },
        {
            "split": "train",
            "captions": ["a woman."],
            "file_path": "CUHK01/0002.png",
            "processed_tokens": [["a", "woman"]],
            "id": 2,
        },
        {
            "split": "train",
            "captions": ["the man in red again."],
            "file_path": "train_query/p1_s2.jpg",
            "processed_tokens": [["the", "man"]],
            "id": 1,
        },
        {
            "split": "val",
            "captions": ["val one.", "val two."],
            "file_path": "v/1.png",
            "processed_tokens": [],
            "id": 7,
        },
        {
            "split": "query",
            "captions": ["odd split."],
            "file_path": "q/1.png",
            "processed_tokens": [],
            "id": 8,
        },
        {
            "split": "test",
            "captions": ["test a.", "test b."],
            "file_path": "t/1.png",
            "processed_tokens": [],
            "id": 12,
        },
        {
            "split": "test",
            "captions": ["test c.", "test d."],
            "file_path": "t/2.png",
            "processed_tokens": [],
            "id": 12,
        },
    ]
    base.mkdir()
    (base / "reid_raw.json").write_text(json.dumps(records))
    data = D.read_person_annotations(tmp_path, "CUHK-PEDES")
    assert data.num_classes == 2
    assert [(c.pid, c.image_id, c.caption) for c in data.train] == [
        (0, 0, "a man in red."),
        (0, 0, "red shirt man."),
        (1, 1, "a woman."),
        (0, 2, "the man in red again."),
    ]
    assert data.train[0].image_path == str(base / "imgs" / "CUHK01/0001.png")
    assert data.val.image_pids == [7, 8] and data.val.captions == ["val one.", "val two.", "odd split."]
    assert data.test.image_pids == [12, 12] and data.test.caption_pids == [12, 12, 12, 12]


def test_icfg_and_rstp_layouts_and_ivt_caption_filters(tmp_path: Path) -> None:
    long_tokens = [f"w{i}" for i in range(95)]
    long_caption = " ".join(long_tokens) + "."
    icfg = [
        {"split": "train", "captions": [long_caption], "file_path": "train/0.jpg",
         "processed_tokens": [long_tokens], "id": 0},
        {"split": "train", "captions": ["short, one."], "file_path": "train/1.jpg",
         "processed_tokens": [["short", "one"]], "id": 1},
        {"split": "test", "captions": ["test person."], "file_path": "test/9.jpg",
         "processed_tokens": [["test", "person"]], "id": 3200},
    ]
    (tmp_path / "ICFG-PEDES").mkdir()
    (tmp_path / "ICFG-PEDES" / "ICFG-PEDES.json").write_text(json.dumps(icfg))
    data = D.read_person_annotations(tmp_path, "ICFG-PEDES")
    assert [c.pid for c in data.train] == [0, 1] and data.train[0].caption == long_caption  # IRRA: no cut
    assert data.val.image_paths == [] and data.test.image_pids == [3200]
    levels = D.read_person_caption_level(tmp_path, "ICFG-PEDES")
    assert levels["train"][0].caption == " ".join(long_tokens[:90]) + " "  # cut before token #91
    assert levels["test"][0].pid == 3200

    rstp = [
        {
            "id": 5,
            "img_path": "0005_c1.jpg",
            "captions": ["a " * 95 + "man.", "a girl, in blue."],
            "split": "train",
        },
        {"id": 9, "img_path": "0009_c3.jpg", "captions": ["a boy.", "boy again."], "split": "train"},
        {"id": 40, "img_path": "0040_c2.jpg", "captions": ["x.", "y."], "split": "val"},
    ]
    (tmp_path / "RSTPReid").mkdir()
    (tmp_path / "RSTPReid" / "data_captions.json").write_text(json.dumps(rstp))
    with pytest.raises(ValueError, match="0..C-1"):
        D.read_person_annotations(tmp_path, "RSTPReid")  # IRRA asserts contiguous train pids
    levels = D.read_person_caption_level(tmp_path, "RSTPReid")
    assert [(c.pid, c.caption) for c in levels["train"]] == [
        (0, "a girl, in blue."),
        (1, "a boy."),
        (1, "boy again."),
    ]  # sorted relabel, long one dropped
    assert levels["train"][0].image_path == str(tmp_path / "RSTPReid" / "imgs" / "0005_c1.jpg")
    assert [c.pid for c in levels["val"]] == [40, 40]
    unfiltered = D.read_person_caption_level(tmp_path, "RSTPReid", apply_ivt_filters=False)
    assert len(unfiltered["train"]) == 4


def test_karpathy_hand_written_split(tmp_path: Path) -> None:
    (tmp_path / "id_mapping.json").write_text(json.dumps({"0": "a.jpg", "1": "b.jpg", "2": "c.jpg"}))
    (tmp_path / "train_caps.txt").write_text("".join(f"cap {i} \n" for i in range(10)))
    (tmp_path / "train_ids.txt").write_text("2\n0\n")
    (tmp_path / "test_caps.txt").write_text("".join(f"t{i}\n" for i in range(5)))
    (tmp_path / "test_ids.txt").write_text("1\n" * 5)
    train = D.read_karpathy_split(tmp_path, "train")
    assert train.captions[3] == "cap 3" and train.caption_image_ids() == [2] * 5 + [0] * 5
    assert train.image_path("/imgs", 2) == Path("/imgs/c.jpg")
    test = D.read_karpathy_split(tmp_path, "test")
    assert test.im_div == 1 and test.unique_image_ids() == [1]
    (tmp_path / "dev_caps.txt").write_text("x\ny\nz\n")
    (tmp_path / "dev_ids.txt").write_text("0\n")
    with pytest.raises(ValueError, match="five captions"):
        D.read_karpathy_split(tmp_path, "dev")


def _write_refer(root: Path, dataset: str, refs: list[dict], instances: dict) -> None:
    (root / dataset).mkdir(parents=True)
    with open(root / dataset / "refs(unc).p", "wb") as handle:
        pickle.dump(refs, handle, protocol=2)
    (root / dataset / "instances.json").write_text(json.dumps(instances))


def test_refer_hand_written_splits_masks_and_boxes(tmp_path: Path) -> None:
    from pycocotools import mask as mask_utils

    square = [2.0, 2.0, 12.0, 2.0, 12.0, 12.0, 2.0, 12.0]
    overlapping = [8.0, 8.0, 16.0, 8.0, 16.0, 16.0, 8.0, 16.0]
    block = np.zeros((20, 30), dtype=np.uint8)
    block[5:9, 20:26] = 1
    compressed = mask_utils.encode(np.asfortranarray(block))
    annotations = [
        {
            "id": 100,
            "image_id": 1,
            "category_id": 1,
            "segmentation": [square, overlapping],
            "bbox": [2, 2, 14, 14],
            "area": 164.0,
            "iscrowd": 0,
        },
        {
            "id": 101,
            "image_id": 1,
            "category_id": 1,
            "bbox": [20, 5, 6, 4],
            "area": 24.0,
            "iscrowd": 0,
            "segmentation": [{"size": [20, 30], "counts": compressed["counts"].decode("ascii")}],
        },
        {
            "id": 102,
            "image_id": 2,
            "category_id": 2,
            "bbox": [20, 5, 6, 4],
            "area": 24.0,
            "iscrowd": 0,
            "segmentation": {
                "size": [20, 30],
                "counts": mask_utils.frPyObjects(
                    {"size": [20, 30], "counts": [int(v) for v in _uncompressed_counts(block)]}, 20, 30
                )["counts"].decode(),
            },
        },
    ]
    instances = {
        "images": [
            {"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 20, "width": 30},
            {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "height": 20, "width": 30},
        ],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "cat"}],
    }

    def sentence(i: int, raw: str) -> dict:
        return {"tokens": raw.lower().split(), "raw": raw, "sent_id": i, "sent": raw.lower()}

    refs = [
        {
            "ref_id": 0,
            "ann_id": 100,
            "image_id": 1,
            "category_id": 1,
            "split": "train",
            "sentences": [sentence(0, "Left man"), sentence(1, "man on left")],
            "sent_ids": [0, 1],
            "file_name": "x",
        },
        {
            "ref_id": 1,
            "ann_id": 101,
            "image_id": 1,
            "category_id": 1,
            "split": "testA",
            "sentences": [sentence(2, "right man")],
            "sent_ids": [2],
            "file_name": "x",
        },
        {
            "ref_id": 2,
            "ann_id": 102,
            "image_id": 2,
            "category_id": 2,
            "split": "testAB",
            "sentences": [sentence(3, "cat")],
            "sent_ids": [3],
            "file_name": "x",
        },
        {
            "ref_id": 3,
            "ann_id": 102,
            "image_id": 2,
            "category_id": 2,
            "split": "val",
            "sentences": [sentence(4, "the cat")],
            "sent_ids": [4],
            "file_name": "x",
        },
    ]
    _write_refer(tmp_path, "refcoco", refs, instances)
    for image_id in (1, 2):
        _png(
            tmp_path / "images/mscoco/images/train2014" / f"COCO_train2014_00000000000{image_id}.jpg",
            (30, 20),
        )
    refer = D.read_refer(tmp_path, "refcoco", "unc")
    assert refer.ref_ids("train") == [0] and refer.ref_ids("val") == [3]
    assert (
        refer.ref_ids("testA") == [1, 2] and refer.ref_ids("testB") == [2] and refer.ref_ids("test") == [1, 2]
    )
    assert refer.categories == {1: "person", 2: "cat"}

    summed = refer.ref_mask_sum(refer.refs_by_id[0])
    assert summed.max() == 2  # the two polygon parts overlap
    lavt = refer.ref_mask(refer.refs_by_id[0])
    assert lavt[summed == 2].sum() == 0 and lavt[summed == 1].all()  # LAVT: overlap becomes background
    assert np.array_equal(refer.ref_mask(refer.refs_by_id[1]), block)  # compressed RLE, counts as str
    assert np.array_equal(refer.ref_mask(refer.refs_by_id[2]), block)  # a single RLE dict
    np.testing.assert_allclose(refer.ref_box_xyxy(refer.refs_by_id[1]), [20, 5, 26, 9])

    dataset = D.ReferDataset(refer, "test", unit="sentence", text_field="sent")
    assert [dataset[i]["text"] for i in range(len(dataset))] == ["right man", "cat"]
    assert dataset[0]["image"].size == (30, 20)

    _write_refer(tmp_path, "refclef", [dict(refs[1], split="test")], instances)
    _png(tmp_path / "images/saiapr_tc-12" / "COCO_train2014_000000000001.jpg", (30, 20))
    clef = D.read_refer(tmp_path, "refclef", "unc")
    assert clef.image_path(clef.refs[0]).parent == tmp_path / "images/saiapr_tc-12"
    assert D.ReferDataset(clef, "test", unit="ref")[0]["text"] == "right man"


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO uncompressed RLE counts (column-major runs, starting with zeros)."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return counts


def test_uncompressed_rle_segmentation(tmp_path: Path) -> None:
    block = np.zeros((6, 5), dtype=np.uint8)
    block[1:4, 2:4] = 1
    segmentation = [{"size": [6, 5], "counts": _uncompressed_counts(block)}]
    assert np.array_equal(D.decode_segmentation(segmentation, 6, 5), block)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_refs_pickle_refuses_code(tmp_path: Path) -> None:
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 0, "payload": _Evil()}], protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        D.load_refs_pickle(path)


# ==========================================================================================================
# augmentation factories


def test_person_and_caption_train_transforms(tmp_path: Path) -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 90, 3), dtype=np.uint8))
    torch.manual_seed(0)
    irra = torch.stack([D.irra_train_transform()(image) for _ in range(40)])
    assert irra.shape == (40, 3, 384, 128)
    mean = torch.tensor(D.CLIP_MEAN).view(3, 1, 1)
    erased = [(x == mean).all(0).float().mean().item() for x in irra]  # RandomErasing fills the raw mean
    assert 0.2 < np.mean([e > 0.01 for e in erased]) < 0.8
    padded = [(x == (0 - torch.tensor(D.CLIP_MEAN).view(3, 1, 1)) / torch.tensor(D.CLIP_STD).view(3, 1, 1))
              .all(0).any().item() for x in irra]
    assert any(padded)  # Pad(10) + RandomCrop shows zero-padding
    ivt = D.ivt_train_transform()(image)
    assert ivt.shape == (3, 384, 128)
    laps = D.laps_train_transform()(image)
    assert laps.shape == (3, 224, 224)
    torch.manual_seed(3)
    a = D.laps_train_transform()(image)
    torch.manual_seed(3)
    assert torch.equal(a, D.laps_train_transform()(image))


def _refer_sample(text: str) -> dict:
    mask = np.zeros((300, 500), dtype=np.uint8)
    mask[100:180, 320:420] = 1
    rgb = np.zeros((300, 500, 3), dtype=np.uint8)
    rgb[mask.astype(bool)] = (250, 20, 20)
    return {"image": Image.fromarray(rgb), "text": text, "mask": mask,
            "box_xyxy": np.array([320, 100, 420, 180], dtype=np.float32)}


def test_scanformer_transform_keeps_box_mask_and_inverse_map() -> None:
    transform = D.scanformer_train_transform(256)
    torch.manual_seed(0)
    flipped = 0
    for _ in range(30):
        out = transform(_refer_sample("the red box"))
        assert out["image"].shape == (3, 256, 256) and out["pixel_mask"].shape == (256, 256)
        x1, y1, x2, y2 = out["box_xyxy"].tolist()
        ys, xs = torch.nonzero(out["mask"], as_tuple=True)
        assert xs.min() >= x1 - 1 and xs.max() <= x2 + 1 and ys.min() >= y1 - 1 and ys.max() <= y2 + 1
        assert out["pixel_mask"][ys, xs].all()
        cx, cy, w, h = (out["box_cxcywh"] * 256).tolist()
        assert abs(cx - (x1 + x2) / 2) < 1e-3 and abs(w - (x2 - x1)) < 1e-3
        if out["affine"][0] < 0:
            flipped += 1
        if out["box_xyxy"][2] - out["box_xyxy"][0] > 0 and out["mask"].sum() > 0:
            np.testing.assert_allclose(D.canvas_box_to_original(out["box_xyxy"].tolist(), out["affine"]),
                                       [320, 100, 420, 180], atol=1.5)
    assert 5 < flipped < 25


@pytest.mark.parametrize("multi_scale", [False, True])
def test_scanformer_resized_image_cache_gives_the_same_samples(multi_scale: bool) -> None:
    """``resized_cache_mb`` (ScanFormer's demo preset) keeps each resized image as a tensor and crops, flips and
    normalises that: every output, the canvas bit for bit, equals the PIL path's under the same random draws,
    also for repeated images (cache hits), direction words (no crop), masks (always PIL) and the multi-scale
    sizes above the canvas (PIL); an image with other pixels is another entry."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((300, 500), (180, 140))]
    plain = D.scanformer_train_transform(256, multi_scale=multi_scale)
    cached = D.scanformer_train_transform(256, multi_scale=multi_scale, resized_cache_mb=64)
    texts = ("the red box", "the box on the left", "box at the top right")
    for step in range(24):
        image = images[step % 2]
        w, h = image.size
        sample = {"image": image, "text": texts[step % 3],
                  "box_xyxy": np.array([0.3 * w, 0.2 * h, 0.7 * w, 0.6 * h], dtype=np.float32)}
        if step % 8 == 7:
            sample["mask"] = np.zeros((h, w), dtype=np.uint8)
        outs = []
        for transform in (plain, cached):
            torch.manual_seed(step)
            outs.append(transform(dict(sample)))
        assert outs[0].keys() == outs[1].keys()
        for key, value in outs[0].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, outs[1][key]), (step, key)
            elif key != "image":
                assert value == outs[1][key] if not isinstance(value, np.ndarray) else np.array_equal(value,
                                                                                                    outs[1][key])
    assert cached.resized_cache is not None and plain.resized_cache is None
    entries = len(cached.resized_cache.tensors)
    assert 2 <= entries <= (2 if not multi_scale else 18)
    changed = images[0].copy()
    changed.putpixel((0, 0), (1, 2, 3))
    torch.manual_seed(0)
    cached({"image": changed, "text": "the box on the left", "box_xyxy": np.array([10, 10, 50, 50])})
    assert len(cached.resized_cache.tensors) == entries + 1


def test_scanformer_flip_swaps_left_and_right_and_direction_words_stop_zoom() -> None:
    transform = D.ScanformerTransform(256, train=True, flip_prob=1.0)
    torch.manual_seed(1)
    for _ in range(10):
        out = transform(_refer_sample("the box on the right, left of nothing"))
        assert out["text"] == "the box on the left, right of nothing"
        assert out["affine"][0] < 0 and abs(out["affine"][0]) <= 256 / 500 + 1e-9  # never enlarged beyond S
    test = D.scanformer_test_transform(256)(_refer_sample("the red box"))
    assert test["affine"] == (256 / 500, 0.0, 256 / 500, (256 - 154) // 2) and test["text"] == "the red box"
    assert D.swap_left_right("left, right, leftmost") == "right, left, rightmost"


def test_magnet_transform_resizes_image_and_nearest_mask() -> None:
    out = D.magnet_train_transform(120)(_refer_sample("x"))
    assert out["image"].shape == (3, 120, 120) and out["mask"].dtype == torch.int64
    assert set(out["mask"].unique().tolist()) == {0, 1}
    # box 100x80 of 500x300 -> 24 x 32 pixels at 120 x 120 (nearest)
    assert abs(int(out["mask"].sum()) - 24 * 32) <= 2 * (24 + 32)


def test_grayscale_only_where_the_expression_names_no_colour() -> None:
    """``demo_colour_free_augmentation``: off (the very same transform) at probability 0; otherwise a sample
    whose expression has a colour word always keeps its colours, and one without loses them in about
    ``probability`` of the draws, before the wrapped transform runs (its box and mask are untouched)."""
    inner = D.magnet_train_transform(64)
    assert D.demo_colour_free_augmentation(inner, 0.0) is inner
    transform = D.demo_colour_free_augmentation(lambda sample: sample, 0.5)
    torch.manual_seed(0)
    for text in ("the red square", "Square that is RED on the left"):
        assert all(np.asarray(transform(_refer_sample(text))["image"])[140, 370].tolist() == [250, 20, 20]
                   for _ in range(20))
    grey = 0
    for _ in range(200):
        out = transform(_refer_sample("the square on the left"))
        pixel = np.asarray(out["image"])[140, 370]
        grey += int(pixel[0] == pixel[1] == pixel[2])
        assert out["box_xyxy"].tolist() == [320, 100, 420, 180] and int(out["mask"].sum()) == 80 * 100
    assert 70 <= grey <= 130
    original = _refer_sample("the square")
    D.demo_colour_free_augmentation(lambda sample: sample, 1.0)(original)
    assert np.asarray(original["image"])[140, 370].tolist() == [250, 20, 20]  # the caller's sample is not changed


def test_channel_permutation_only_where_the_expression_names_no_colour() -> None:
    """``PermuteChannelsWithoutColourWords``: a sample whose expression has a colour word keeps its colours; one
    without gets its RGB channels in each of the six orders (the identity included) about equally often - the
    same pixel values, reordered, so the image stays in colour - before the wrapped transform runs (box and mask
    untouched)."""
    transform = D.demo_colour_free_augmentation(lambda sample: sample, 0.0, permute_channels=True)
    assert isinstance(transform, D.PermuteChannelsWithoutColourWords)
    torch.manual_seed(0)
    assert all(np.asarray(transform(_refer_sample("the small red square"))["image"])[140, 370].tolist()
               == [250, 20, 20] for _ in range(20))
    seen: dict[tuple[int, ...], int] = {}
    for _ in range(300):
        out = transform(_refer_sample("the square on the left"))
        pixel = tuple(np.asarray(out["image"])[140, 370].tolist())
        assert sorted(pixel) == [20, 20, 250]
        seen[pixel] = seen.get(pixel, 0) + 1
        assert out["box_xyxy"].tolist() == [320, 100, 420, 180] and int(out["mask"].sum()) == 80 * 100
    # (250, 20, 20) comes from two orders (identity and green<->blue), the other two pixels from two each
    assert set(seen) == {(250, 20, 20), (20, 250, 20), (20, 20, 250)}
    assert all(70 <= count <= 130 for count in seen.values())
    both = D.demo_colour_free_augmentation(lambda sample: sample, 0.5, permute_channels=True)
    assert isinstance(both, D.GrayscaleWithoutColourWords)
    assert isinstance(both.inner, D.PermuteChannelsWithoutColourWords)


# ==========================================================================================================
# text corruption and samplers


def test_irra_mlm_mask_follows_the_official_rule() -> None:
    rng = random.Random(0)
    masked_total = selected_total = eligible_total = 0
    for _ in range(300):
        ids = torch.tensor([49406] + [rng.randrange(1, 49405) for _ in range(30)] + [49407] + [0] * 5)
        masked, labels = D.irra_mlm_mask(ids.clone(), rng)
        assert labels[0] == 0 and labels[31] == 0 and (labels[32:] == 0).all()
        chosen = labels != 0
        assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
        masked_total += int((masked[chosen] == 49405).sum())
        selected_total += int(chosen.sum())
        eligible_total += 30
    assert 0.13 < selected_total / eligible_total < 0.17
    assert 0.75 < masked_total / selected_total < 0.85

    class NeverSelect(random.Random):
        def random(self) -> float:
            return 0.99

    ids = torch.tensor([49406, 320, 1929, 49407, 0])
    masked, labels = D.irra_mlm_mask(ids, NeverSelect())
    assert masked.tolist() == [49406, 49405, 1929, 49407, 0] and labels.tolist() == [0, 320, 0, 0, 0]


def test_ivt_multi_level_texts() -> None:
    caption = "a man in a red shirt, blue pants and white shoes. he carries a bag."
    assert D.ivt_phrase_candidates(caption) == ["blue pants and white shoes", "a man in a red shirt",
                                                "he carries a bag"]
    rng = random.Random(0)
    assert {D.ivt_phrase_level_text(caption, rng) for _ in range(50)} == set(D.ivt_phrase_candidates(caption))
    words = {D.ivt_word_level_text("A Man In Red, With A Bag, ok.", "ICFG-PEDES", rng) for _ in range(50)}
    assert words == {"a man in red", "with a bag"}
    attrs = {"upper": "red shirt", "lower": "blue pants"}
    cuhk = {D.ivt_word_level_text(caption, "CUHK-PEDES", rng, attributes=attrs) for _ in range(80)}
    assert (
        cuhk <= {"red shirt", "blue pants", "red shirt,blue pants", "blue pants,red shirt"} and len(cuhk) >= 3
    )
    assert D.ivt_split_words("a man,in red. shirt? ok") == ["a", "man", "in", "red", "shirt", "ok"]


class _ScriptedRandom(random.Random):
    def __init__(self, values: list[float]) -> None:
        super().__init__(0)
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)

    def choice(self, seq):  # a subclass overriding random() would make choice() consume the script
        return seq[0]


def test_laps_size_augment_branches() -> None:
    pieces = [["a"], ["cr", "##eme"], ["man"], ["runs"]]
    rng = _ScriptedRandom([0.05, 0.11, 0.15, 0.5])  # mask, random token, delete, keep
    out = D.laps_size_augment(pieces, vocab=["zzz"], rng=rng)
    assert out == ["[CLS]", "[MASK]", "zzz", "zzz", "runs", "[SEP]"]
    assert D.laps_size_augment(pieces, vocab=["zzz"], train=False) == [
        "[CLS]",
        "a",
        "cr",
        "##eme",
        "man",
        "runs",
        "[SEP]",
    ]


def test_decoded_image_cache_returns_private_copies_within_its_budget(tmp_path: Path) -> None:
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for i, path in enumerate(paths):
        _png(path, (20, 10), (10 * i, 100, 200))
    one_image_mb = 20 * 10 * 3 / 2**20
    cache = D.DecodedImageCache(max_mb=2.5 * one_image_mb)
    for path in paths:
        assert np.array_equal(np.asarray(cache(path)), np.asarray(D.read_image(path)))
    assert len(cache.images) == 2 and cache.held_bytes == 2 * 20 * 10 * 3  # the third did not fit
    first = cache(paths[0])
    first.paste((0, 0, 0), (0, 0, 20, 10))  # a caller changing its image must not change the cache
    assert np.array_equal(np.asarray(cache(paths[0])), np.asarray(D.read_image(paths[0])))
    assert D.image_reader(0) is D.read_image
    assert isinstance(D.image_reader(8), D.DecodedImageCache)


def test_text_cache_computes_each_text_once_and_copies_values() -> None:
    calls: list[str] = []

    def encode(text: str) -> torch.Tensor:
        calls.append(text)
        return torch.tensor([len(text), 1])

    cache = D.TextCache(encode, max_items=2, copy=torch.clone)
    first = cache("a red shirt")
    first[0] = -1  # changing a returned value must not change the remembered one
    assert cache("a red shirt").tolist() == [11, 1]
    cache("blue")
    cache("green")  # over max_items: computed, not remembered
    cache("green")
    assert calls == ["a red shirt", "blue", "green", "green"]


def test_bert_word_pieces_match_the_tokenizer() -> None:
    from models.tokenizers import bert_tokenizer

    tokenizer = bert_tokenizer()
    text = "A woman's crème-brûlée, on the LEFT!"
    pieces = D.bert_word_pieces(text, tokenizer)
    assert [p for word in pieces for p in word] == tokenizer.tokenize(text)
    assert len(pieces) > 5


def test_random_identity_sampler() -> None:
    pids = [i // 3 for i in range(30)] + [10]  # ten ids with 3 items, one id with a single item
    sampler = D.RandomIdentitySampler(pids, batch_size=8, num_instances=2, seed=1)
    order = list(sampler)
    assert len(order) % 8 == 0 and len(order) > 0
    for start in range(0, len(order), 2):
        assert pids[order[start]] == pids[order[start + 1]]
    for start in range(0, len(order), 8):
        assert len({pids[i] for i in order[start:start + 8]}) == 4
    assert order == list(sampler)
    sampler.set_epoch(1)
    assert order != list(sampler)


def test_random_identity_sampler_can_fill_batches_with_one_group() -> None:
    """The demo aid for IVT (``shared_colour_fraction``): half of each batch's identities share the group of
    its first identity (here 6 groups of 10 ids); without groups the sampler draws as before."""
    pids = [i // 4 for i in range(240)]  # 60 ids x 4 items
    groups = [pid % 6 for pid in pids]
    plain = D.RandomIdentitySampler(pids, batch_size=16, num_instances=2, seed=3)
    assert list(plain) == list(D.RandomIdentitySampler(pids, 16, 2, seed=3, groups=groups, group_fraction=0.0))
    grouped = D.RandomIdentitySampler(pids, batch_size=16, num_instances=2, seed=3, groups=groups,
                                      group_fraction=0.5)
    order = list(grouped)
    assert len(order) == len(list(plain)) and len(set(order)) == len(order)
    shared_plain, shared_grouped = [], []
    for sampled, shared in ((list(plain), shared_plain), (order, shared_grouped)):
        for start in range(0, len(sampled), 16):
            batch_pids = [pids[i] for i in sampled[start:start + 16:2]]
            first_group = batch_pids[0] % 6
            shared.append(sum(pid % 6 == first_group for pid in batch_pids))
    assert min(shared_grouped[:10]) >= 4  # the first 4 of 8 ids share the group while every id is available
    assert sum(shared_grouped) > 1.5 * sum(shared_plain)
