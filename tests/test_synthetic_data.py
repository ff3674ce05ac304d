"""The synthetic benchmark generator: determinism, held-out combinations, consistent boxes / masks / texts."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import synthetic
from training.datasets import decode_segmentation

ROOT = Path(__file__).resolve().parents[1]
LOCATION_WORDS = {"left", "right", "top", "bottom", "middle", "center"}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    out = tmp_path_factory.mktemp("synthetic")
    return out, synthetic.generate(out, "all", seed=11, size="small", progress=False)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in synthetic.iter_files(root)}


def test_generation_is_deterministic_per_seed(tmp_path: Path) -> None:
    first = synthetic.generate(tmp_path / "a", "all", seed=5, size="tiny", progress=False)
    second = synthetic.generate(tmp_path / "b", "all", seed=5, size="tiny", progress=False)
    other = synthetic.generate(tmp_path / "c", "all", seed=6, size="tiny", progress=False)
    tree_a, tree_b, tree_c = (_tree_bytes(tmp_path / n) for n in "abc")
    assert tree_a == tree_b
    assert {k: m["version"] for k, m in first.items()} == {k: m["version"] for k, m in second.items()}
    for kind in synthetic.KINDS:
        assert first[kind]["version"] != other[kind]["version"]
        assert f"seed5/tiny/{first[kind]['content_sha256'][:8]}" in first[kind]["version"]
    differing = [k for k in tree_a if k.endswith(".jpg") and tree_a[k] != tree_c.get(k)]
    assert len(differing) > len(tree_a) // 2


def test_a_kind_does_not_depend_on_the_other_kinds(tmp_path: Path) -> None:
    synthetic.generate(tmp_path / "all", "all", seed=2, size="tiny", progress=False)
    synthetic.generate(tmp_path / "one", "person", seed=2, size="tiny", progress=False)
    assert _tree_bytes(tmp_path / "all" / "person") == _tree_bytes(tmp_path / "one" / "person")


def test_parallel_generation_writes_what_a_sequential_run_writes(tmp_path: Path) -> None:
    """``generate_parallel`` (two child processes at a time, as ``training.demo`` generates its data) gives the
    very files and versions of one sequential run, and a failing child is reported."""
    sequential = synthetic.generate_pinned(tmp_path / "seq", "all", seed=3, size="tiny", progress=False)
    parallel = synthetic.generate_parallel(tmp_path / "par", list(synthetic.KINDS), seed=3, size="tiny", jobs=2)
    assert {k: m["version"] for k, m in parallel.items()} == {k: m["version"] for k, m in sequential.items()}
    assert _tree_bytes(tmp_path / "par") == _tree_bytes(tmp_path / "seq")
    with pytest.raises(RuntimeError, match="failed"):
        synthetic.generate_parallel(tmp_path / "bad", ["refer", "person"], seed=3, size="no-such-size", jobs=2)


def _processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains ``text`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.mark.parametrize("runner", ["generate_parallel", "cli"])
def test_sigterm_stops_the_generator_children(tmp_path: Path, runner: str) -> None:
    """``kill`` of a process generating under ``sigterm_as_exit`` (``training.demo``'s main through
    ``generate_parallel``, two children; the ``training.synthetic`` CLI, one pinned child through
    ``generate_pinned``) stops its generator children too, instead of leaving them running without a parent."""
    out = tmp_path / "killed"
    if runner == "cli":
        command = ["-m", "training.synthetic", "--out", str(out), "--kind", "caption", "--size", "medium",
                   "--no-progress"]
        children = 1
    else:
        command = ["-c", "from training.synthetic import generate_parallel, sigterm_as_exit\n"
                   "with sigterm_as_exit():\n"
                   f"    generate_parallel({str(out)!r}, ['caption', 'person'], seed=3, size='medium', jobs=2)\n"]
        children = 2
    # started already pinned (some machines set OPENBLAS_CORETYPE for every process), the CLI generates in-process
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    parent = subprocess.Popen([sys.executable, *command], cwd=ROOT, env=env)
    deadline = time.monotonic() + 60
    while len([p for p in _processes_mentioning(f"--out {out}") if p != parent.pid]) < children:
        assert parent.poll() is None and time.monotonic() < deadline, "the generators did not start"
        time.sleep(0.1)
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) != 0
    deadline = time.monotonic() + 10
    while _processes_mentioning(f"--out {out}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_mentioning(f"--out {out}") == []


def test_cli_writes_every_kind_with_a_version(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.synthetic",
            "--out",
            str(tmp_path),
            "--kind",
            "caption",
            "--seed",
            "3",
            "--size",
            "tiny",
            "--no-progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "caption" / "manifest.json").read_text())
    assert manifest["version"] in result.stdout
    assert manifest["seed"] == 3 and manifest["size"] == "tiny"
    assert not (tmp_path / "refer").exists()


# ----------------------------------------------------------------------------------------------------------
# refer


def _refer_files(out: Path) -> tuple[list[dict], dict]:
    base = out / "refer" / synthetic.REFER_DATASET_NAME
    with open(base / "refs(unc).p", "rb") as handle:
        refs = pickle.load(handle)
    return refs, json.loads((base / "instances.json").read_text())


def test_refer_heldout_split_uses_only_unseen_colour_shape_combinations(generated) -> None:
    out, manifests = generated
    refs, instances = _refer_files(out)
    split_of_image = {r["image_id"]: r["split"] for r in refs}
    combos: dict[str, set] = {"train": set(), "val": set(), "test": set()}
    for ann in instances["annotations"]:
        attrs = ann["attributes"]
        combos[split_of_image[ann["image_id"]]].add((attrs["colour"], attrs["shape"]))
    assert combos["test"] and combos["train"]
    assert not combos["test"] & (combos["train"] | combos["val"])
    assert combos["test"] <= {tuple(c) for c in manifests["refer"]["heldout_combinations"]}
    # a new combination, not a new word: each held-out colour and shape occurs in training
    assert {c for c, _ in combos["test"]} <= {c for c, _ in combos["train"]}
    assert {s for _, s in combos["test"]} <= {s for _, s in combos["train"]}
    # the texts agree: no "<colour> <shape>" bigram of the test split occurs in a training sentence
    def bigrams(split: str) -> set[str]:
        words = [s["sent"] for r in refs if r["split"] == split for s in r["sentences"]]
        return {f"{c} {s}" for text in words for c in synthetic.SHAPE_COLOURS for s in synthetic.SHAPES
                if f"{c} {s}" in text}
    assert bigrams("test") and not bigrams("test") & bigrams("train")


def test_refer_boxes_masks_and_pixels_agree(generated) -> None:
    out, _ = generated
    _, instances = _refer_files(out)
    images = {img["id"]: img for img in instances["images"]}
    image_dir = out / "refer" / "images" / synthetic.REFER_DATASET_NAME
    pixels_cache: dict[int, np.ndarray] = {}
    for ann in instances["annotations"][:120]:
        info = images[ann["image_id"]]
        mask = decode_segmentation(ann["segmentation"], info["height"], info["width"])
        assert mask.shape == (info["height"], info["width"]) and mask.max() == 1
        ys, xs = np.nonzero(mask)
        assert len(xs) > 20
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= info["width"] and y + h <= info["height"]
        assert xs.min() >= np.floor(x) - 1 and xs.max() <= np.ceil(x + w) + 1
        assert ys.min() >= np.floor(y) - 1 and ys.max() <= np.ceil(y + h) + 1
        polygon = np.asarray(ann["segmentation"][0]).reshape(-1, 2)
        perimeter = np.linalg.norm(polygon - np.roll(polygon, 1, axis=0), axis=1).sum()
        assert abs(ann["area"] - len(xs)) <= 0.6 * perimeter + 2  # rasterisation differs only along the edge
        if ann["image_id"] not in pixels_cache:
            pixels_cache[ann["image_id"]] = np.asarray(
                Image.open(image_dir / info["file_name"]), dtype=np.float32
            )
        inside = pixels_cache[ann["image_id"]][mask.astype(bool)].mean(axis=0)
        expected = np.array(synthetic.SHAPE_COLOURS[ann["attributes"]["colour"]], dtype=np.float32)
        assert np.abs(inside - expected).max() < 45, (ann["id"], inside, expected)


def test_refer_rle_masks_equal_the_painted_objects(tmp_path: Path) -> None:
    synthetic.generate(tmp_path, "refer", seed=4, size="tiny", mask_format="rle", progress=False)
    refs, instances = _refer_files(tmp_path)
    images = {img["id"]: img for img in instances["images"]}
    for ann in instances["annotations"]:
        info = images[ann["image_id"]]
        assert isinstance(ann["segmentation"], dict) and isinstance(ann["segmentation"]["counts"], str)
        mask = decode_segmentation(ann["segmentation"], info["height"], info["width"])
        assert int(mask.sum()) == ann["area"] > 0


def _mentioned(sentence: str) -> tuple[dict[str, str], str | None]:
    words = sentence.split()
    attrs: dict[str, str] = {}
    for word in words:
        if word in synthetic.SHAPE_COLOURS:
            attrs["colour"] = word
        if word in synthetic.SHAPES:
            attrs["shape"] = word
        for size, synonyms in synthetic.SIZE_WORDS.items():
            if word in synonyms:
                attrs["size"] = size
    location = next((w for w in words if w in LOCATION_WORDS), None)
    return attrs, location


def test_every_expression_singles_out_its_object(generated) -> None:
    out, _ = generated
    refs, instances = _refer_files(out)
    objects_by_image: dict[int, list[dict]] = {}
    for ann in instances["annotations"]:
        x, y, w, h = ann["bbox"]
        objects_by_image.setdefault(ann["image_id"], []).append(
            {"id": ann["id"], "cx": x + w / 2, "cy": y + h / 2, **ann["attributes"]})
    checked = 0
    for ref in refs:
        objects = objects_by_image[ref["image_id"]]
        for sentence in ref["sentences"]:
            attrs, location = _mentioned(sentence["sent"])
            assert "shape" in attrs, sentence
            matching = [o for o in objects if all(o[k] == v for k, v in attrs.items())]
            assert any(o["id"] == ref["ann_id"] for o in matching)
            target = next(o for o in matching if o["id"] == ref["ann_id"])
            others = [o for o in matching if o["id"] != ref["ann_id"]]
            if location is None:
                assert not others, sentence
            elif location == "left":
                assert all(target["cx"] < o["cx"] for o in others)
            elif location == "right":
                assert all(target["cx"] > o["cx"] for o in others)
            elif location == "top":
                assert all(target["cy"] < o["cy"] for o in others)
            elif location == "bottom":
                assert all(target["cy"] > o["cy"] for o in others)
            else:
                assert sum(o["cx"] < target["cx"] for o in others) == 1 == len(others) - 1
            checked += 1
    assert checked >= 100


# ----------------------------------------------------------------------------------------------------------
# person


def test_person_records_ids_and_heldout_clothing(generated) -> None:
    out, manifests = generated
    records = json.loads((out / "person" / "CUHK-PEDES" / "reid_raw.json").read_text())
    preset = synthetic.SIZE_PRESETS["small"]
    ids = {s: sorted({r["id"] for r in records if r["split"] == s}) for s in ("train", "val", "test")}
    n_train, n_val, n_test = preset.person_identities
    assert ids["train"] == list(range(1, n_train + 1))
    assert ids["val"] == list(range(n_train + 1, n_train + n_val + 1))
    assert len(ids["test"]) == n_test
    combos = {s: {(r["attributes"]["upper_colour"], r["attributes"]["lower_colour"]) for r in records
                  if r["split"] == s} for s in ids}
    assert not combos["test"] & (combos["train"] | combos["val"])
    assert combos["test"] <= {tuple(c) for c in manifests["person"]["heldout_combinations"]}
    for record in records:
        assert len(record["captions"]) == 2 and len(record["processed_tokens"]) == 2
        attrs = record["attributes"]
        for caption in record["captions"]:
            assert f"{attrs['upper_colour']} " in caption and f"{attrs['lower_colour']} " in caption
        image = Image.open(out / "person" / "CUHK-PEDES" / "imgs" / record["file_path"])
        assert image.size == (preset.person_crop[1], preset.person_crop[0]) and image.mode == "RGB"
    views = {}
    for record in records:
        views.setdefault(record["id"], []).append(record["file_path"])
    assert all(len(v) == preset.person_views for v in views.values())
    # the views of one identity differ (pose / scale / background jitter)
    first = [np.asarray(Image.open(out / "person" / "CUHK-PEDES" / "imgs" / p)) for p in views[1]]
    assert not np.array_equal(first[0], first[1])


# ----------------------------------------------------------------------------------------------------------
# caption


def test_caption_files_follow_the_karpathy_layout(generated) -> None:
    out, manifests = generated
    base = out / "caption" / synthetic.CAPTION_DATASET_NAME
    mapping = json.loads((base / "id_mapping.json").read_text())
    attributes = json.loads((base / "attributes.json").read_text())
    lines = {s: (base / f"{s}_caps.txt").read_text().splitlines() for s in ("train", "dev", "test")}
    ids = {s: (base / f"{s}_ids.txt").read_text().split() for s in ("train", "dev", "test")}
    n_train, n_dev, n_test = synthetic.SIZE_PRESETS["small"].caption_images
    assert len(ids["train"]) == n_train and len(lines["train"]) == 5 * n_train
    for split, n in (("dev", n_dev), ("test", n_test)):
        assert len(ids[split]) == len(lines[split]) == 5 * n
        assert all(len(set(ids[split][i:i + 5])) == 1 for i in range(0, len(ids[split]), 5))
    for image_id in mapping:
        assert (out / "caption" / "images" / mapping[image_id]).is_file()
    combos = {s: {(c, sh) for i in set(ids[s]) for c, sh, _ in attributes[i]} for s in ids}
    assert not combos["test"] & (combos["train"] | combos["dev"])
    assert combos["test"] <= {tuple(c) for c in manifests["caption"]["heldout_combinations"]}
    # captions name what is drawn: each caption mentions a colour and a shape of its own image
    for split in ("train", "test"):
        per_image = ids[split] if split != "train" else [i for i in ids[split] for _ in range(5)]
        for image_id, caption in zip(per_image, lines[split], strict=True):
            drawn = attributes[image_id]
            assert any(c in caption.lower() and sh in caption.lower() for c, sh, _ in drawn), caption


def test_demo_refer_data_version_does_not_depend_on_the_cpu(tmp_path: Path) -> None:
    """The demo data the manifest names comes out on this CPU too: COCO areas go through numpy's BLAS dot, whose
    rounding differs between OpenBLAS's AVX2 and AVX-512 kernels, so generation pins the AVX2 ones (this
    machine picks the AVX-512 ones by itself and wrote another refer version before the pinning)."""
    if not synthetic._cpu_runs_pinned_blas():
        pytest.skip("the pinned OpenBLAS kernels need an x86-64 CPU with AVX2 and FMA")
    manifest = json.loads((ROOT / "weights" / "demo" / "manifest.json").read_text())
    made = synthetic.generate_pinned(tmp_path, "refer", int(manifest["seed"]), manifest["data_size"],
                                     progress=False)
    assert made["refer"]["version"] == manifest["data_versions"]["refer"]
