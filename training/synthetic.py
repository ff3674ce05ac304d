"""Deterministic synthetic benchmarks, written in the official dataset formats.

Three kinds, each generated from ``numpy.random.default_rng([seed, kind code])`` alone, so a kind's bytes
depend only on (seed, size preset, generator version) and not on which other kinds are generated in the same
run:

- ``refer``: scenes of coloured shapes with referring expressions ("the small red circle on the left"),
  written as the refer API (lichengunc/refer) lays out RefCOCO: ``<dataset>/refs(unc).p`` (a pickle list of
  refs) and ``<dataset>/instances.json`` (COCO images / annotations with polygon or RLE segmentation, bbox
  ``xywh``).
- ``person``: figure-like person crops (upper/lower clothing colours, garment types, hat, bag, hair, shoes),
  several views per identity (pose, scale, position, background and mirror jitter), two descriptions per
  image, written as IRRA reads CUHK-PEDES: ``CUHK-PEDES/reid_raw.json`` + ``CUHK-PEDES/imgs/``.
- ``caption``: scenes of 1-3 shapes with exactly five captions per image, written as LAPS reads its Karpathy
  splits: ``{split}_caps.txt``, ``{split}_ids.txt`` (train: one id per image; dev/test: each id five times)
  and ``id_mapping.json`` + images.

Splits are ``train`` / ``val`` (``dev`` for captions) / ``test``. ``test`` is the held-out split: it uses only
attribute combinations that never occur in ``train`` or ``val`` (refer and caption: every object's (colour,
shape); person: the identity's (upper colour, lower colour)). The held-out combinations are one seeded
"diagonal" of the attribute grid, so every single colour and shape still occurs in training. ``val`` has new
scenes / identities with training combinations (in-distribution).

Each kind folder gets a ``manifest.json`` whose ``version`` string names the generator version, seed, size and
a sha256 over everything written (image pixels, annotation bytes), e.g.
``synthetic-refer/g1/seed0/small/3fa2c1d0``. Images are JPEG (quality 92, no chroma subsampling).

CLI: ``python -m training.synthetic --out DIR --kind {refer,person,caption,all} --seed S --size small``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

GENERATOR_VERSION = "1"
# A kind whose output changed since generator 1 carries its own version (the others keep their data versions):
# caption 2: every caption of a scene names all of it; person 2: plain teal scenes, no clutter;
# refer 2: 2-3 larger objects per scene (``REFER_RADII``, ``REFER_OBJECTS``), medium canvas 160 x 128.
KIND_GENERATOR_VERSIONS: dict[str, str] = {"caption": "2", "person": "2", "refer": "2"}
KINDS: tuple[str, ...] = ("refer", "person", "caption")
KIND_CODES: dict[str, int] = {"refer": 1, "person": 2, "caption": 3}

# Folder names under each kind's root (real data: refcoco / refcoco+ / refcocog / refclef, f30k / coco).
REFER_DATASET_NAME = "refsynth"
REFER_SPLIT_BY = "unc"
PERSON_DATASET_NAME = "CUHK-PEDES"
CAPTION_DATASET_NAME = "synth"  # LAPS: data_path/<dataset>/{split}_caps.txt
CAPTIONS_PER_IMAGE = 5  # LAPS hard-codes im_div = 5 for the train split

# ----------------------------------------------------------------------------------------------------------
# Size presets


@dataclass(frozen=True)
class SizePreset:
    """How much of each kind to generate. Sizes are (width, height); ``person_crop`` is (height, width)."""

    refer_images: tuple[int, int, int]  # train, val, test
    refer_canvas: tuple[int, int]
    person_identities: tuple[int, int, int]
    person_views: int
    person_crop: tuple[int, int]
    caption_images: tuple[int, int, int]  # train, dev, test
    caption_canvas: tuple[int, int]


SIZE_PRESETS: dict[str, SizePreset] = {
    "tiny": SizePreset((8, 3, 3), (96, 80), (6, 3, 3), 2, (96, 32), (8, 3, 3), (64, 64)),
    "small": SizePreset((48, 12, 12), (160, 128), (24, 6, 6), 3, (144, 48), (48, 12, 12), (128, 128)),
    "medium": SizePreset(
        (2000, 250, 250), (160, 128), (1000, 100, 100), 4, (288, 96), (4000, 500, 500), (224, 224)
    ),
    "large": SizePreset(
        (16000, 1500, 1500), (480, 384), (4000, 500, 500), 4, (384, 128), (29000, 1000, 1000), (256, 256)
    ),
}

# ----------------------------------------------------------------------------------------------------------
# Vocabulary

SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 35),
    "purple": (140, 55, 180),
    "orange": (240, 135, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "hexagon")
OBJECT_SIZES: tuple[str, ...] = ("small", "large")
# Radius ranges (fractions of the canvas's short side) per size word: caption scenes, and referring scenes
# (generator 2: larger, so the small from-scratch demo models see each object over several patches).
OBJECT_RADII: dict[str, tuple[float, float]] = {"small": (0.07, 0.10), "large": (0.15, 0.20)}
REFER_RADII: dict[str, tuple[float, float]] = {"small": (0.12, 0.15), "large": (0.21, 0.26)}
REFER_OBJECTS: tuple[int, int] = (2, 3)  # objects per referring scene (generator 1: 2-4)
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (232, 232, 228),
    "grey": (150, 150, 150),
    "black": (38, 38, 42),
    "beige": (222, 206, 172),
}
LOCATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "to the left", "at left"),
    "right": ("on the right", "to the right", "at right"),
    "top": ("at the top", "on top"),
    "bottom": ("at the bottom", "on the bottom"),
    "middle": ("in the middle", "in the center"),
}

CLOTHING_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (30, 30, 32),
    "white": (235, 235, 235),
    "red": (200, 35, 40),
    "blue": (35, 70, 190),
    "green": (40, 140, 60),
    "yellow": (230, 200, 40),
    "grey": (128, 128, 128),
    "pink": (235, 140, 180),
}
SHOE_COLOURS: dict[str, tuple[int, int, int]] = {"black": (25, 25, 25), "white": (240, 240, 240),
                                                  "brown": (110, 70, 35)}
HAIR_COLOURS: dict[str, tuple[int, int, int]] = {"black": (20, 18, 18), "brown": (100, 60, 30),
                                                  "blonde": (220, 190, 110)}
PERSON_WALL: tuple[int, int, int] = (96, 150, 158)  # teal scene behind the figures (generator 2)
PERSON_FLOOR: tuple[int, int, int] = (70, 112, 118)
SKIN_TONES: tuple[tuple[int, int, int], ...] = (
    (241, 204, 170),
    (224, 172, 130),
    (176, 120, 80),
    (110, 72, 48),
)
UPPER_GARMENTS: dict[str, tuple[str, ...]] = {
    "short": ("t-shirt", "short-sleeved shirt", "short sleeved top"),
    "long": ("long-sleeved shirt", "jacket", "sweater"),
}
LOWER_GARMENTS: dict[str, tuple[str, ...]] = {"trousers": ("trousers", "pants"), "shorts": ("shorts",),
                                              "skirt": ("skirt",)}


def heldout_pairs(
    first: Sequence[str], second: Sequence[str], rng: np.random.Generator
) -> list[tuple[str, str]]:
    """One seeded diagonal of the ``first x second`` grid: pair i of ``first`` with a permuted i of
    ``second``.

    Every value of either attribute appears in exactly one held-out pair and in the remaining training pairs,
    so the held-out split tests new *combinations* of attribute values that are each known from training.
    """
    perm = rng.permutation(len(second))
    return [(first[i], second[int(perm[i % len(second)])]) for i in range(len(first))]


# ----------------------------------------------------------------------------------------------------------
# Output helpers


class HashingWriter:
    """Writes files under a root and hashes what it writes, in write order, into one sha256: the bytes of text
    files, and for images the decoded pixels (mode, size, RGB bytes) rather than the JPEG stream, so the
    version does not change with the JPEG encoder's version."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.digest = hashlib.sha256()
        self.files: list[str] = []

    def write_bytes(self, rel_path: str, data: bytes, content: bytes | None = None) -> None:
        path = self.root / rel_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        hashed = data if content is None else content
        self.digest.update(rel_path.encode("utf-8") + b"\0" + hashlib.sha256(hashed).digest())
        self.files.append(rel_path)

    def write_jpeg(self, rel_path: str, image: Image.Image) -> None:
        """JPEG as the real datasets ship (quality 92, no chroma subsampling: sharp colour edges, ~6x smaller
        than PNG on these textured scenes)."""
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=92, subsampling=0)
        pixels = f"{image.mode}:{image.width}x{image.height}:".encode() + image.tobytes()
        self.write_bytes(rel_path, buffer.getvalue(), content=pixels)

    def write_json(self, rel_path: str, obj: object) -> None:
        self.write_bytes(rel_path, json.dumps(obj, sort_keys=False, separators=(",", ":")).encode("utf-8"))

    def write_lines(self, rel_path: str, lines: Sequence[str]) -> None:
        self.write_bytes(rel_path, "".join(line + "\n" for line in lines).encode("utf-8"))


def generator_version(kind: str) -> str:
    return KIND_GENERATOR_VERSIONS.get(kind, GENERATOR_VERSION)


def data_version(kind: str, seed: int, size: str, content_sha256: str) -> str:
    """The version string stamped into a manifest (and into anything trained or indexed from the data)."""
    return f"synthetic-{kind}/g{generator_version(kind)}/seed{seed}/{size}/{content_sha256[:8]}"


def _write_manifest(writer: HashingWriter, kind: str, seed: int, size: str, extra: dict) -> dict:
    content = writer.digest.hexdigest()
    manifest = {
        "kind": kind,
        "version": data_version(kind, seed, size, content),
        "generator_version": generator_version(kind),
        "seed": seed,
        "size": size,
        "content_sha256": content,
        "num_files": len(writer.files),
        **extra,
    }
    (writer.root / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)


def _clean_sentence(raw: str) -> str:
    """RefCOCO's ``sent``: lower case, punctuation dropped, single spaces."""
    return " ".join(re.findall(r"[a-z0-9\-]+", raw.lower()))


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9\-]+", text.lower())


def expression_words(text: str) -> set[str]:
    """The lower-case words (letters only) of an expression, as the colour / location / size checks of the
    evaluation (``training.evaluate.expression_cue``) and of the grey-scale augmentation read it."""
    return set(re.findall(r"[a-z]+", text.lower()))


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _jitter_colour(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)  # type: ignore[return-value]


def _background(width: int, height: int, base: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """A vertical two-tone gradient around ``base`` with a smooth mottled texture (noise drawn on a grid 8x
    coarser and upsampled bilinearly), uint8 [H, W, 3]."""
    top = np.array(_jitter_colour(base, rng, 18), dtype=np.float32)
    bottom = np.array(_jitter_colour(base, rng, 18), dtype=np.float32)
    ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    noise = rng.normal(0.0, 8.0, (height // 8 + 2, width // 8 + 2, 3))
    coarse = Image.fromarray(np.clip(128 + noise, 0, 255).astype(np.uint8), mode="RGB")
    texture = np.asarray(coarse.resize((width, height), Image.Resampling.BILINEAR))
    canvas = top * (1.0 - ramp) + bottom * ramp + (texture.astype(np.float32) - 128.0)
    return np.clip(canvas, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# Shapes (shared by refer and caption scenes)


@dataclass
class ShapeObject:
    """One drawn object; ``polygon`` is the COCO flat list [x1, y1, x2, y2, ...] that was rasterised."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    radius: float
    polygon: list[float] = field(default_factory=list)

    @property
    def combo(self) -> tuple[str, str]:
        return (self.colour, self.shape)

    def bbox_xywh(self) -> list[float]:
        xs, ys = self.polygon[0::2], self.polygon[1::2]
        return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def shape_polygon(shape: str, cx: float, cy: float, radius: float, rotation: float) -> list[float]:
    """Vertices of ``shape`` inscribed in the circle (cx, cy, radius): a COCO flat list, 0.01 px precision."""
    if shape == "circle":
        angles = np.linspace(0.0, 2 * math.pi, 32, endpoint=False)
        radii = np.full_like(angles, radius)
    elif shape == "square":
        angles = np.array([0.25, 0.75, 1.25, 1.75]) * math.pi + rotation
        radii = np.full_like(angles, radius)
    elif shape == "triangle":
        angles = np.array([-0.5, 1 / 6, 5 / 6]) * math.pi + rotation
        radii = np.full_like(angles, radius)
    elif shape == "diamond":
        angles = np.array([0.0, 0.5, 1.0, 1.5]) * math.pi
        radii = np.array([0.7, 1.0, 0.7, 1.0]) * radius
    elif shape == "hexagon":
        angles = np.arange(6) * math.pi / 3 + rotation
        radii = np.full_like(angles, radius)
    elif shape == "star":
        angles = np.arange(10) * math.pi / 5 - math.pi / 2 + rotation
        radii = np.where(np.arange(10) % 2 == 0, radius, 0.45 * radius)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    xs = cx + radii * np.cos(angles)
    ys = cy + radii * np.sin(angles)
    return [round(float(v), 2) for pair in zip(xs, ys, strict=True) for v in pair]


def polygon_area(polygon: Sequence[float]) -> float:
    """Shoelace area of a COCO flat polygon (COCO's ``area`` is this up to rasterisation)."""
    xs, ys = np.asarray(polygon[0::2]), np.asarray(polygon[1::2])
    return round(float(0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))), 2)


def rasterize_polygon(polygon: Sequence[float], width: int, height: int) -> np.ndarray:
    """PIL's rasterisation of one polygon, bool [H, W] (what the generator paints)."""
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(
        [(polygon[i], polygon[i + 1]) for i in range(0, len(polygon), 2)], fill=255
    )
    return np.asarray(canvas) > 0


def _paint_object(
    canvas: np.ndarray, mask: np.ndarray, rgb: tuple[int, int, int], rng: np.random.Generator
) -> None:
    """Fill ``mask`` with ``rgb`` shaded by a random linear light direction (at most 18% darker)."""
    height, width = mask.shape
    direction = rng.normal(size=2)
    direction /= np.linalg.norm(direction) + 1e-9
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (xx * direction[0] + yy * direction[1])[mask]
    if ramp.size == 0:
        return
    span = float(ramp.max() - ramp.min()) or 1.0
    shade = 1.0 - 0.18 * (ramp - ramp.min()) / span
    canvas[mask] = np.clip(np.array(rgb, dtype=np.float32)[None, :] * shade[:, None], 0, 255).astype(np.uint8)


def _place_objects(
    specs: Sequence[tuple[str, str, str]], width: int, height: int, rng: np.random.Generator,
    radii: dict[str, tuple[float, float]] = OBJECT_RADII,
) -> list[ShapeObject] | None:
    """Non-overlapping placement (circumscribed circles apart) of (colour, shape, size) specs, or None."""
    short_side = min(width, height)
    placed: list[ShapeObject] = []
    for colour, shape, size in specs:
        low, high = radii[size]
        radius = float(rng.uniform(low, high)) * short_side
        for _attempt in range(60):
            cx = float(rng.uniform(radius + 2, width - radius - 2))
            cy = float(rng.uniform(radius + 2, height - radius - 2))
            if all(math.hypot(cx - o.cx, cy - o.cy) > radius + o.radius + 3 for o in placed):
                break
        else:
            return None
        rotation = float(rng.uniform(-0.25, 0.25))
        obj = ShapeObject(shape, colour, size, cx, cy, radius)
        obj.polygon = shape_polygon(shape, cx, cy, radius, rotation)
        placed.append(obj)
    return placed


def _render_shapes(
    objects: Sequence[ShapeObject], width: int, height: int, background: str, rng: np.random.Generator
) -> tuple[Image.Image, list[np.ndarray]]:
    canvas = _background(width, height, BACKGROUNDS[background], rng)
    masks = []
    for obj in objects:
        mask = rasterize_polygon(obj.polygon, width, height)
        _paint_object(canvas, mask, _jitter_colour(SHAPE_COLOURS[obj.colour], rng, 14), rng)
        masks.append(mask)
    return Image.fromarray(canvas, mode="RGB"), masks


def _sample_specs(
    count: int, combos: Sequence[tuple[str, str]], rng: np.random.Generator
) -> list[tuple[str, str, str]]:
    """(colour, shape, size) for ``count`` objects from allowed combos; later objects often share attributes
    with the first one, so that referring expressions need colour, size or location to single it out."""
    first_colour, first_shape = _pick(rng, combos)
    specs = [(first_colour, first_shape, _pick(rng, OBJECT_SIZES))]
    for _ in range(count - 1):
        mode = rng.random()
        if mode < 0.25:
            pool = [c for c in combos if c[1] == first_shape]
        elif mode < 0.45:
            pool = [c for c in combos if c[0] == first_colour]
        elif mode < 0.6:
            pool = [(first_colour, first_shape)]
        else:
            pool = list(combos)
        colour, shape = _pick(rng, pool or list(combos))
        specs.append((colour, shape, _pick(rng, OBJECT_SIZES)))
    order = rng.permutation(len(specs))
    return [specs[int(i)] for i in order]


# ----------------------------------------------------------------------------------------------------------
# Referring expressions


DESCRIPTOR_SETS: tuple[tuple[str, ...], ...] = (
    ("shape",),
    ("colour", "shape"),
    ("size", "shape"),
    ("size", "colour", "shape"),
)


def relative_location(
    target: ShapeObject, confusers: Sequence[ShapeObject], width: int, height: int
) -> str | None:
    """Where ``target`` is among ``confusers`` (which include it): left/right/top/bottom when it is the
    extreme one by a clear margin (10% of the side), middle when it is clearly between exactly two others
    horizontally."""
    others = [o for o in confusers if o is not target]
    if not others:
        return None
    mx, my = 0.1 * width, 0.1 * height
    if all(target.cx < o.cx - mx for o in others):
        return "left"
    if all(target.cx > o.cx + mx for o in others):
        return "right"
    if all(target.cy < o.cy - my for o in others):
        return "top"
    if all(target.cy > o.cy + my for o in others):
        return "bottom"
    if len(others) == 2:
        left, right = sorted(others, key=lambda o: o.cx)
        if left.cx + mx < target.cx < right.cx - mx:
            return "middle"
    return None


def valid_descriptions(
    target: ShapeObject, objects: Sequence[ShapeObject], width: int, height: int
) -> list[tuple[tuple[str, ...], str | None]]:
    """Every (attribute set, location or None) that singles out ``target``, simplest first."""
    found: list[tuple[tuple[str, ...], str | None]] = []
    for attrs in DESCRIPTOR_SETS:
        confusers = [o for o in objects if all(getattr(o, a) == getattr(target, a) for a in attrs)]
        if len(confusers) == 1:
            found.append((attrs, None))
        else:
            location = relative_location(target, confusers, width, height)
            if location is not None:
                found.append((attrs, location))
    return found


def render_expression(
    target: ShapeObject, attrs: Sequence[str], location: str | None, rng: np.random.Generator
) -> str:
    """One raw referring expression in a RefCOCO-like style (short, sometimes without article)."""
    size_word = _pick(rng, SIZE_WORDS[target.size]) if "size" in attrs else None
    loc_phrase = (" " + _pick(rng, LOCATION_PHRASES[location])) if location else ""
    style = int(rng.integers(3))
    if style == 2 and "colour" in attrs:
        head = " ".join(w for w in ("the", size_word, target.shape) if w)
        return f"{head} that is {target.colour}{loc_phrase}"
    words = [size_word, target.colour if "colour" in attrs else None, target.shape]
    noun_phrase = " ".join(w for w in words if w)
    text = f"{noun_phrase}{loc_phrase}" if style == 1 else f"the {noun_phrase}{loc_phrase}"
    return text.capitalize() if rng.random() < 0.2 else text


@dataclass
class ReferScene:
    """One generated referring image: the objects, their PIL masks and 1-3 expressions per object."""

    width: int
    height: int
    background: str
    objects: list[ShapeObject]
    masks: list[np.ndarray]
    expressions: list[list[str]]
    image: Image.Image


def generate_refer_scene(
    rng: np.random.Generator, canvas: tuple[int, int], combos: Sequence[tuple[str, str]]
) -> ReferScene:
    """A scene of ``REFER_OBJECTS`` shapes where every object has at least one uniquely identifying expression."""
    base_w, base_h = canvas
    while True:
        width = int(round(base_w * rng.uniform(0.85, 1.15)))
        height = int(round(base_h * rng.uniform(0.85, 1.15)))
        specs = _sample_specs(int(rng.integers(REFER_OBJECTS[0], REFER_OBJECTS[1] + 1)), combos, rng)
        objects = _place_objects(specs, width, height, rng, REFER_RADII)
        if objects is None:
            continue
        options = [valid_descriptions(o, objects, width, height) for o in objects]
        if all(options):
            break
    expressions: list[list[str]] = []
    for obj, found in zip(objects, options, strict=True):
        chosen = [found[0]]
        rest = found[1:]
        extra = int(rng.integers(0, min(2, len(rest)) + 1))
        for i in rng.permutation(len(rest))[:extra]:
            chosen.append(rest[int(i)])
        sentences: list[str] = []
        for attrs, location in chosen:
            sentence = render_expression(obj, attrs, location, rng)
            if sentence not in sentences:
                sentences.append(sentence)
        expressions.append(sentences)
    background = _pick(rng, tuple(BACKGROUNDS))
    image, masks = _render_shapes(objects, width, height, background, rng)
    return ReferScene(width, height, background, objects, masks, expressions, image)


def _rle_segmentation(mask: np.ndarray) -> dict:
    """COCO compressed RLE of a bool mask, with ``counts`` as a str (as json stores it)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _split_plan(counts: Sequence[int], names: Sequence[str]) -> list[str]:
    return [name for name, count in zip(names, counts, strict=True) for _ in range(count)]


def generate_refer(
    out: Path, seed: int, size: str, mask_format: str = "polygon", progress: bool = True
) -> dict:
    """Writes ``out/<refsynth>/refs(unc).p``, ``out/<refsynth>/instances.json`` and
    ``out/images/<refsynth>/``."""
    if mask_format not in ("polygon", "rle"):
        raise ValueError("mask_format must be 'polygon' or 'rle'")
    preset = SIZE_PRESETS[size]
    rng = np.random.default_rng([seed, KIND_CODES["refer"]])
    heldout = heldout_pairs(tuple(SHAPE_COLOURS), SHAPES, rng)
    train_combos = [(c, s) for c in SHAPE_COLOURS for s in SHAPES if (c, s) not in heldout]
    categories = [{"id": i + 1, "name": s, "supercategory": "shape"} for i, s in enumerate(SHAPES)]
    category_id = {s: i + 1 for i, s in enumerate(SHAPES)}
    writer = HashingWriter(out)
    images, annotations, refs = [], [], []
    ann_id, ref_id, sent_id = 1, 0, 0
    plan = _split_plan(preset.refer_images, ("train", "val", "test"))
    with _progress(len(plan), "refer", progress) as bar:
        for index, split in enumerate(plan):
            image_id = index + 1
            scene = generate_refer_scene(
                rng, preset.refer_canvas, heldout if split == "test" else train_combos
            )
            file_name = f"synth_{image_id:06d}.jpg"
            writer.write_jpeg(f"images/{REFER_DATASET_NAME}/{file_name}", scene.image)
            images.append(
                {"id": image_id, "file_name": file_name, "height": scene.height, "width": scene.width}
            )
            for obj, mask, sentences in zip(scene.objects, scene.masks, scene.expressions, strict=True):
                if mask_format == "polygon":
                    segmentation, area = [obj.polygon], polygon_area(obj.polygon)
                else:
                    segmentation, area = _rle_segmentation(mask), float(mask.sum())
                annotations.append({
                    "id": ann_id, "image_id": image_id, "category_id": category_id[obj.shape],
                    "segmentation": segmentation, "area": area,
                    "bbox": [round(v, 2) for v in obj.bbox_xywh()], "iscrowd": 0,
                    "attributes": {"colour": obj.colour, "shape": obj.shape, "size": obj.size},
                })
                sentence_records = []
                for raw in sentences:
                    clean = _clean_sentence(raw)
                    sentence_records.append(
                        {"tokens": clean.split(), "raw": raw, "sent_id": sent_id, "sent": clean}
                    )
                    sent_id += 1
                refs.append(
                    {
                        "ref_id": ref_id,
                        "ann_id": ann_id,
                        "image_id": image_id,
                        "category_id": category_id[obj.shape],
                        "split": split,
                        "sentences": sentence_records,
                        "sent_ids": [s["sent_id"] for s in sentence_records],
                        "file_name": f"synth_{image_id:06d}_{ann_id}.jpg",  # refer API: "ignore filename"
                    }
                )
                ann_id += 1
                ref_id += 1
            bar.update(1)
    instances = {
        "info": {"description": "synthetic referring scenes", "generator_version": GENERATOR_VERSION},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    writer.write_json(f"{REFER_DATASET_NAME}/instances.json", instances)
    writer.write_bytes(f"{REFER_DATASET_NAME}/refs({REFER_SPLIT_BY}).p", pickle.dumps(refs, protocol=2))
    split_counts = {s: sum(1 for r in refs if r["split"] == s) for s in ("train", "val", "test")}
    return _write_manifest(writer, "refer", seed, size, {
        "format": "refer (lichengunc/refer): refs(unc).p + instances.json",
        "dataset": REFER_DATASET_NAME, "split_by": REFER_SPLIT_BY, "mask_format": mask_format,
        "image_dir": f"images/{REFER_DATASET_NAME}", "refs_per_split": split_counts,
        "heldout_split": "test", "heldout_attribute": ["colour", "shape"],
        "heldout_combinations": [list(c) for c in heldout],
    })


# ----------------------------------------------------------------------------------------------------------
# Persons


@dataclass(frozen=True)
class PersonIdentity:
    """Everything that makes an identity; two identities never share all fields."""

    gender: str
    upper_colour: str
    sleeves: str
    lower_colour: str
    lower_type: str
    shoes: str
    hair_length: str
    hair_colour: str
    hat: str | None
    bag_type: str | None
    bag_colour: str | None
    skin: int

    @property
    def combo(self) -> tuple[str, str]:
        return (self.upper_colour, self.lower_colour)


def sample_identity(rng: np.random.Generator, combos: Sequence[tuple[str, str]]) -> PersonIdentity:
    upper, lower = _pick(rng, combos)
    gender = _pick(rng, ("man", "woman"))
    lower_types = ("trousers", "shorts", "skirt") if gender == "woman" else ("trousers", "shorts")
    hair_length = (
        _pick(rng, ("long", "short")) if gender == "woman" else _pick(rng, ("short", "short", "long"))
    )
    has_bag = rng.random() < 0.6
    return PersonIdentity(
        gender=gender, upper_colour=upper, sleeves=_pick(rng, ("short", "long")), lower_colour=lower,
        lower_type=_pick(rng, lower_types), shoes=_pick(rng, tuple(SHOE_COLOURS)),
        hair_length=hair_length, hair_colour=_pick(rng, tuple(HAIR_COLOURS)),
        hat=_pick(rng, tuple(CLOTHING_COLOURS)) if rng.random() < 0.35 else None,
        bag_type=_pick(rng, ("backpack", "handbag")) if has_bag else None,
        bag_colour=_pick(rng, tuple(CLOTHING_COLOURS)) if has_bag else None,
        skin=int(rng.integers(len(SKIN_TONES))),
    )


def describe_person(person: PersonIdentity, rng: np.random.Generator) -> str:
    """One CUHK-PEDES-like description; always names the upper and lower garments and their colours."""
    noun = _pick(rng, (person.gender, person.gender, "person"))
    pronoun = {"man": "He", "woman": "She"}[person.gender] if noun != "person" else "The person"
    possessive = {"man": "his", "woman": "her"}[person.gender]
    upper = f"{person.upper_colour} {_pick(rng, UPPER_GARMENTS[person.sleeves])}"
    lower = f"{person.lower_colour} {_pick(rng, LOWER_GARMENTS[person.lower_type])}"
    article = "an" if upper[0] in "aeiou" else "a"
    lower_article = "" if person.lower_type in ("trousers", "shorts") else "a "
    hair = f"{person.hair_length} {person.hair_colour} hair"
    shoes = f"{person.shoes} shoes"
    clauses = []
    if rng.random() < 0.5:
        opening = f"{_pick(rng, ('A', 'The', 'This'))} {noun} with {hair} is wearing {article} {upper}"
    else:
        verb = _pick(rng, ("wearing", "dressed in", "in"))
        opening = f"{_pick(rng, ('A', 'The'))} {noun} {verb} {article} {upper}"
    if rng.random() < 0.7:
        clauses.append(f"{opening}, {lower_article}{lower} and {shoes}.")
    else:
        clauses.append(f"{opening} and {lower_article}{lower}.")
    extras = []
    if person.bag_type is not None:
        verb = _pick(rng, ("is carrying", "carries", "has"))
        where = " on " + possessive + " back" if person.bag_type == "backpack" and rng.random() < 0.5 else ""
        extras.append(f"{pronoun} {verb} a {person.bag_colour} {person.bag_type}{where}.")
    if person.hat is not None:
        extras.append(
            f"{pronoun} {_pick(rng, ('wears', 'has on'))} a {person.hat} {_pick(rng, ('hat', 'cap'))}."
        )
    if "hair" not in opening and rng.random() < 0.6:
        extras.append(f"{pronoun} has {hair}.")
    order = rng.permutation(len(extras))
    clauses.extend(extras[int(i)] for i in order)
    return " ".join(clauses)


def render_person(person: PersonIdentity, crop_hw: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """One view: a figure drawn at 2x and downsampled (antialiased), with pose, scale, position, background
    and mirror jitter. Coordinates below are in units of the figure height, x relative to the figure
    centre."""
    out_h, out_w = crop_hw
    ss = 2
    height, width = out_h * ss, out_w * ss
    # Generator 2: a teal wall and floor (a hue no clothing, hair or shoe colour has) and no clutter, so the
    # figure stands out; generator 1's grey scenes and grey clutter blended with black / grey / white clothes.
    wall = _jitter_colour(PERSON_WALL, rng, 14)
    floor = _jitter_colour(PERSON_FLOOR, rng, 14)
    horizon = int(height * rng.uniform(0.55, 0.85))
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    canvas[:horizon] = _background(width, horizon, wall, rng)
    canvas[horizon:] = _background(width, height - horizon, floor, rng)
    image = Image.fromarray(canvas, mode="RGB")
    draw = ImageDraw.Draw(image)

    fig_h = height * float(rng.uniform(0.78, 0.95))
    top = float(rng.uniform(0.01 * height, height - fig_h - 0.01 * height))
    centre = width / 2 + float(rng.uniform(-0.1, 0.1)) * width
    skin = SKIN_TONES[person.skin]

    def pt(x: float, y: float) -> tuple[float, float]:
        return (centre + x * fig_h, top + y * fig_h)

    def box(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
        return [pt(min(x0, x1), min(y0, y1)), pt(max(x0, x1), max(y0, y1))]

    def line_width(units: float) -> int:
        return max(1, int(round(units * fig_h)))

    upper_rgb = _jitter_colour(CLOTHING_COLOURS[person.upper_colour], rng, 12)
    lower_rgb = _jitter_colour(CLOTHING_COLOURS[person.lower_colour], rng, 12)
    hair_rgb = HAIR_COLOURS[person.hair_colour]
    bag_side = 1 if rng.random() < 0.5 else -1
    if person.bag_type == "backpack":
        bag_rgb = CLOTHING_COLOURS[person.bag_colour or "black"]
        draw.rectangle(box(bag_side * 0.07, 0.17, bag_side * 0.17, 0.42), fill=bag_rgb)
    if person.hair_length == "long":
        draw.rectangle(box(-0.075, 0.06, 0.075, 0.26), fill=hair_rgb)

    spread = float(rng.uniform(0.0, 0.035))
    ankle_y, hip_y = 0.93, 0.47
    for side in (-1, 1):
        hip_x = side * 0.045
        foot_x = side * (0.045 + spread)
        leg = [pt(hip_x - 0.04, hip_y), pt(hip_x + 0.04, hip_y), pt(foot_x + 0.035, ankle_y),
               pt(foot_x - 0.035, ankle_y)]
        draw.polygon(leg, fill=lower_rgb if person.lower_type == "trousers" else skin)
        if person.lower_type == "shorts":
            knee = 0.64
            t = (knee - hip_y) / (ankle_y - hip_y)
            knee_x = hip_x + (foot_x - hip_x) * t
            draw.polygon([pt(hip_x - 0.045, hip_y), pt(hip_x + 0.045, hip_y), pt(knee_x + 0.042, knee),
                          pt(knee_x - 0.042, knee)], fill=lower_rgb)
        draw.ellipse(box(foot_x - 0.045, ankle_y - 0.01, foot_x + 0.05, ankle_y + 0.04),
                     fill=SHOE_COLOURS[person.shoes])
    if person.lower_type == "skirt":
        draw.polygon([pt(-0.095, hip_y - 0.02), pt(0.095, hip_y - 0.02), pt(0.14, 0.70), pt(-0.14, 0.70)],
                     fill=lower_rgb)

    draw.rectangle(box(-0.025, 0.11, 0.025, 0.16), fill=skin)  # neck
    draw.polygon([pt(-0.115, 0.15), pt(0.115, 0.15), pt(0.095, 0.49), pt(-0.095, 0.49)], fill=upper_rgb)
    hand_points = []
    for side in (-1, 1):
        angle = math.radians(float(rng.uniform(4, 24)))
        shoulder = (side * 0.105, 0.17)
        length = 0.30
        hand = (shoulder[0] + side * length * math.sin(angle), shoulder[1] + length * math.cos(angle))
        sleeve_end = 1.0 if person.sleeves == "long" else 0.4
        elbow = (
            shoulder[0] + (hand[0] - shoulder[0]) * sleeve_end,
            shoulder[1] + (hand[1] - shoulder[1]) * sleeve_end,
        )
        if sleeve_end < 1.0:
            draw.line([pt(*elbow), pt(*hand)], fill=skin, width=line_width(0.04))
        draw.line([pt(*shoulder), pt(*elbow)], fill=upper_rgb, width=line_width(0.055))
        draw.ellipse(box(hand[0] - 0.025, hand[1] - 0.02, hand[0] + 0.025, hand[1] + 0.03), fill=skin)
        hand_points.append(hand)
    if person.bag_type == "backpack":  # strap over the shoulder, in front
        strap_x = bag_side * 0.07
        draw.line(
            [pt(strap_x, 0.15), pt(strap_x * 0.6, 0.40)],
            fill=CLOTHING_COLOURS[person.bag_colour or "black"],
            width=line_width(0.018),
        )

    draw.ellipse(box(-0.065, 0.005, 0.065, 0.135), fill=skin)  # head
    draw.chord(box(-0.07, 0.0, 0.07, 0.10), start=180, end=360, fill=hair_rgb)
    if person.hat is not None:
        hat_rgb = CLOTHING_COLOURS[person.hat]
        draw.rectangle(box(-0.06, -0.035, 0.06, 0.03), fill=hat_rgb)
        draw.rectangle(box(-0.1, 0.02, 0.1, 0.04), fill=hat_rgb)
    if person.bag_type == "handbag":
        hx, hy = hand_points[0 if bag_side < 0 else 1]
        bag_rgb = CLOTHING_COLOURS[person.bag_colour or "black"]
        draw.line([pt(hx, hy), pt(hx, hy + 0.04)], fill=bag_rgb, width=line_width(0.01))
        draw.rectangle(box(hx - 0.045, hy + 0.04, hx + 0.045, hy + 0.12), fill=bag_rgb)

    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image.resize((out_w, out_h), Image.Resampling.LANCZOS)


def generate_person(out: Path, seed: int, size: str, progress: bool = True) -> dict:
    """Writes ``out/CUHK-PEDES/reid_raw.json`` and ``out/CUHK-PEDES/imgs/synth/*.jpg`` (IRRA's root_dir
    layout).

    Ids are 1-based and contiguous over train, then val, then test, so IRRA's ``id - 1`` gives train pids
    0..C-1.
    """
    preset = SIZE_PRESETS[size]
    rng = np.random.default_rng([seed, KIND_CODES["person"]])
    heldout = heldout_pairs(tuple(CLOTHING_COLOURS), tuple(CLOTHING_COLOURS), rng)
    train_combos = [(u, lo) for u in CLOTHING_COLOURS for lo in CLOTHING_COLOURS if (u, lo) not in heldout]
    plan = _split_plan(preset.person_identities, ("train", "val", "test"))
    identities: list[PersonIdentity] = []
    seen: set[PersonIdentity] = set()
    for split in plan:
        while True:
            person = sample_identity(rng, heldout if split == "test" else train_combos)
            if person not in seen:
                break
        seen.add(person)
        identities.append(person)
    writer = HashingWriter(out)
    records = []
    with _progress(len(plan) * preset.person_views, "person", progress) as bar:
        for index, (split, person) in enumerate(zip(plan, identities, strict=True)):
            pid = index + 1
            for view in range(preset.person_views):
                file_path = f"synth/{pid:05d}_{view}.jpg"
                writer.write_jpeg(
                    f"{PERSON_DATASET_NAME}/imgs/{file_path}", render_person(person, preset.person_crop, rng)
                )
                captions = [describe_person(person, rng) for _ in range(2)]
                records.append({
                    "split": split, "captions": captions, "file_path": file_path,
                    "processed_tokens": [_words(c) for c in captions], "id": pid,
                    "attributes": asdict(person),
                })
                bar.update(1)
    writer.write_json(f"{PERSON_DATASET_NAME}/reid_raw.json", records)
    counts = {
        s: {"ids": preset.person_identities[i], "images": preset.person_identities[i] * preset.person_views}
        for i, s in enumerate(("train", "val", "test"))
    }
    return _write_manifest(
        writer,
        "person",
        seed,
        size,
        {
            "format": "CUHK-PEDES reid_raw.json (IRRA): [{split, captions, file_path, processed_tokens, id}]",
            "dataset": PERSON_DATASET_NAME,
            "crop_hw": list(preset.person_crop),
            "views_per_identity": preset.person_views,
            "splits": counts,
            "heldout_split": "test",
            "heldout_attribute": ["upper_colour", "lower_colour"],
            "heldout_combinations": [list(c) for c in heldout],
        },
    )


# ----------------------------------------------------------------------------------------------------------
# Captioned scenes


def _object_phrase(obj: ShapeObject, rng: np.random.Generator, with_size: bool) -> str:
    size_word = _pick(rng, SIZE_WORDS[obj.size]) if with_size else None
    return " ".join(w for w in ("a", size_word, obj.colour, obj.shape) if w)


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption_scene(
    objects: Sequence[ShapeObject], background: str, width: int, rng: np.random.Generator
) -> list[str]:
    """Exactly five captions of one scene, in different styles (list, count, picture, terse, there-is).

    Every caption names every object (size, colour, shape) and the background, so each caption describes
    its scene completely (the generator keeps scenes unique by exactly these fields): a retrieval query is
    never ambiguous between two test images. No left / right words: LAPS's training flip would make them
    wrong half of the time. (Generator 1 left sizes, the background or objects out of most captions, which
    capped text->image R@1 on the held-out split near 40%.)"""
    count_word = {1: "one", 2: "two", 3: "three"}[len(objects)]
    noun = "shape" if len(objects) == 1 else "shapes"

    def phrases(article: bool) -> list[str]:
        order = [objects[int(i)] for i in rng.permutation(len(objects))]
        if article:
            return [_object_phrase(o, rng, True) for o in order]
        return [f"{_pick(rng, SIZE_WORDS[o.size])} {o.colour} {o.shape}" for o in order]

    captions = [
        f"{_join(phrases(True))} on a {background} background",
        f"{count_word} {noun} on {background}: {_join(phrases(False))}",
        f"a {background} picture with {_join(phrases(True))}",
        f"{' and '.join(phrases(False))}, {background}",
        f"there is {_join(phrases(True))} in a {background} image",
    ]
    return [c[0].upper() + c[1:] + "." if rng.random() < 0.5 else c for c in captions]


def generate_caption(out: Path, seed: int, size: str, progress: bool = True) -> dict:
    """Writes LAPS/Karpathy files ``out/synth/{train,dev,test}_{caps,ids}.txt``, ``out/synth/id_mapping.json``
    and images ``out/images/*.jpg``; ``test`` is the held-out split."""
    preset = SIZE_PRESETS[size]
    rng = np.random.default_rng([seed, KIND_CODES["caption"]])
    heldout = heldout_pairs(tuple(SHAPE_COLOURS), SHAPES, rng)
    train_combos = [(c, s) for c in SHAPE_COLOURS for s in SHAPES if (c, s) not in heldout]
    plan = _split_plan(preset.caption_images, ("train", "dev", "test"))
    writer = HashingWriter(out)
    id_mapping: dict[str, str] = {}
    caps: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    ids: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    attributes: dict[str, list[list[str]]] = {}
    seen: set[tuple] = set()
    width, height = preset.caption_canvas
    with _progress(len(plan), "caption", progress) as bar:
        for image_id, split in enumerate(plan):
            combos = heldout if split == "test" else train_combos
            while True:
                count = int(rng.integers(1, 4))
                specs = [(*_pick(rng, combos), _pick(rng, OBJECT_SIZES)) for _ in range(count)]
                background = _pick(rng, tuple(BACKGROUNDS))
                signature = (background, tuple(sorted(specs)))
                if signature in seen:
                    continue
                objects = _place_objects(specs, width, height, rng)
                if objects is not None:
                    break
            seen.add(signature)
            image, _masks = _render_shapes(objects, width, height, background, rng)
            file_name = f"synth_{image_id:06d}.jpg"
            writer.write_jpeg(f"images/{file_name}", image)
            id_mapping[str(image_id)] = file_name
            attributes[str(image_id)] = [[o.colour, o.shape, o.size] for o in objects]
            caps[split].extend(caption_scene(objects, background, width, rng))
            repeats = 1 if split == "train" else CAPTIONS_PER_IMAGE  # Karpathy/LAPS: eval ids are listed 5x
            ids[split].extend([str(image_id)] * repeats)
            bar.update(1)
    for split in ("train", "dev", "test"):
        writer.write_lines(f"{CAPTION_DATASET_NAME}/{split}_caps.txt", caps[split])
        writer.write_lines(f"{CAPTION_DATASET_NAME}/{split}_ids.txt", ids[split])
    writer.write_json(f"{CAPTION_DATASET_NAME}/id_mapping.json", id_mapping)
    writer.write_json(f"{CAPTION_DATASET_NAME}/attributes.json", attributes)
    return _write_manifest(writer, "caption", seed, size, {
        "format": "Karpathy splits as LAPS reads them: {split}_caps.txt, {split}_ids.txt, id_mapping.json",
        "dataset": CAPTION_DATASET_NAME, "image_dir": "images", "captions_per_image": CAPTIONS_PER_IMAGE,
        "splits": {s: {"images": n, "captions": n * CAPTIONS_PER_IMAGE}
                   for s, n in zip(("train", "dev", "test"), preset.caption_images, strict=True)},
        "heldout_split": "test", "heldout_attribute": ["colour", "shape"],
        "heldout_combinations": [list(c) for c in heldout],
    })


# ----------------------------------------------------------------------------------------------------------
# Entry points


def generate(
    out: Path | str,
    kind: str = "all",
    seed: int = 0,
    size: str = "small",
    mask_format: str = "polygon",
    progress: bool = True,
) -> dict[str, dict]:
    """Generates the requested kinds under ``out/<kind>/`` and returns their manifests by kind."""
    if size not in SIZE_PRESETS:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZE_PRESETS)}")
    kinds = KINDS if kind == "all" else (kind,)
    manifests: dict[str, dict] = {}
    for name in kinds:
        target = Path(out) / name
        if name == "refer":
            manifests[name] = generate_refer(target, seed, size, mask_format=mask_format, progress=progress)
        elif name == "person":
            manifests[name] = generate_person(target, seed, size, progress=progress)
        elif name == "caption":
            manifests[name] = generate_caption(target, seed, size, progress=progress)
        else:
            raise ValueError(f"unknown kind {name!r}; choose from {KINDS} or 'all'")
    return manifests


def iter_files(root: Path) -> Iterator[Path]:
    """Every file below ``root`` in a stable order (used to compare two generations)."""
    yield from sorted(p for p in Path(root).rglob("*") if p.is_file())


# The version hash covers the annotation bytes, and COCO ``area`` (and the person generator's arm direction) go
# through numpy's BLAS dot product, whose summation order depends on the OpenBLAS kernel picked for the CPU: an
# AVX-512 machine rounds a few areas differently from an AVX2 one, so the same seed gave other data versions.
# Generation therefore pins OpenBLAS's AVX2 ("Haswell") kernels, with which the demo data was written; OpenBLAS
# reads the variable once, when it loads, so a process that did not start pinned generates in a child process.
PINNED_BLAS_CORE = "Haswell"


def _cpu_runs_pinned_blas() -> bool:
    """The pinned kernels need x86-64 AVX2 + FMA (elsewhere OpenBLAS keeps its own choice)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit`` while the block (or the decorated call) runs, in the main thread only.
    Python's default SIGTERM ends the process without unwinding, which left the generator children here (and
    ``training.demo``'s training pool) running after ``kill``; unwinding lets their ``with`` / ``finally`` /
    ``subprocess.run`` stop them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _generator_command(out: Path | str, kind: str, seed: int, size: str, mask_format: str, progress: bool
                       ) -> tuple[list[str], dict[str, str]]:
    """The ``python -m training.synthetic`` child command for one kind (or all) and its environment: OpenBLAS
    pinned to :data:`PINNED_BLAS_CORE` where the CPU runs it, this source tree on ``PYTHONPATH``."""
    command = [sys.executable, "-m", "training.synthetic", "--out", str(out), "--kind", kind, "--seed", str(seed),
               "--size", size, "--mask-format", mask_format] + ([] if progress else ["--no-progress"])
    env = dict(os.environ)
    if _cpu_runs_pinned_blas():
        env["OPENBLAS_CORETYPE"] = PINNED_BLAS_CORE
    source_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH", "")) if p)
    return command, env


def _read_manifests(out: Path | str, kinds: Sequence[str]) -> dict[str, dict]:
    return {name: json.loads((Path(out) / name / "manifest.json").read_text()) for name in kinds}


def generate_pinned(
    out: Path | str, kind: str = "all", seed: int = 0, size: str = "small", mask_format: str = "polygon",
    progress: bool = True,
) -> dict[str, dict]:
    """:func:`generate` with OpenBLAS pinned to :data:`PINNED_BLAS_CORE` (the same data versions on every
    x86-64 CPU): in this process when it started pinned, otherwise in a child ``python -m training.synthetic``."""
    if os.environ.get("OPENBLAS_CORETYPE") == PINNED_BLAS_CORE or not _cpu_runs_pinned_blas():
        return generate(out, kind, seed, size, mask_format, progress)
    command, env = _generator_command(out, kind, seed, size, mask_format, progress)
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return _read_manifests(out, KINDS if kind == "all" else (kind,))


# Seconds each kind took at size medium, one at a time on a 2-core AMD EPYC whose other core was busy training:
# only their order matters, :func:`generate_parallel` starts the longest first.
GENERATION_SECONDS: dict[str, float] = {"caption": 63.0, "person": 59.0, "refer": 18.0}


def generate_parallel(out: Path | str, kinds: Sequence[str], seed: int = 0, size: str = "small",
                      jobs: int = 2, progress: bool = False) -> dict[str, dict]:
    """:func:`generate_pinned` for several kinds, at most ``jobs`` child processes at a time (longest first).
    Each kind draws from its own seeded generator and writes its own folder, so the data (and data versions)
    are those of a sequential run."""
    kinds = sorted(dict.fromkeys(kinds), key=lambda k: -GENERATION_SECONDS.get(k, 0.0))
    if jobs <= 1 or len(kinds) <= 1:
        for kind in kinds:
            generate_pinned(out, kind, seed, size, progress=progress)
        return _read_manifests(out, kinds)
    waiting = list(kinds)
    running: list[tuple[str, subprocess.Popen]] = []
    failed: list[str] = []
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                kind = waiting.pop(0)
                command, env = _generator_command(out, kind, seed, size, "polygon", progress)
                running.append((kind, subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)))
            time.sleep(0.1)
            for kind, child in [entry for entry in running if entry[1].poll() is not None]:
                running.remove((kind, child))
                if child.returncode != 0:
                    failed.append(kind)
    finally:  # interrupted (KeyboardInterrupt, SystemExit): stop the generators still running
        for _, child in running:
            child.terminate()
            child.wait()
    if failed:
        raise RuntimeError(f"synthetic data generation failed for {failed}")
    return _read_manifests(out, kinds)


@sigterm_as_exit()
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.synthetic", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (one sub-folder per kind)")
    parser.add_argument("--kind", default="all", choices=(*KINDS, "all"))
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--size", default="small", choices=tuple(SIZE_PRESETS))
    parser.add_argument("--mask-format", default="polygon", choices=("polygon", "rle"),
                        help="segmentation stored in instances.json (refer kind)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    manifests = generate_pinned(
        args.out, args.kind, args.seed, args.size, args.mask_format, progress=not args.no_progress
    )
    for name, manifest in manifests.items():
        print(f"{name}: {manifest['version']} ({manifest['num_files']} files) -> {Path(args.out) / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
