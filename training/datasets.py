"""Official-format dataset readers, torch Datasets over them, and each method's official augmentation.

Formats (the same readers serve real data and ``training.synthetic`` output):

- Karpathy splits as LAPS reads them (``lib/image_caption.py``): ``{split}_caps.txt`` (one caption per line),
  ``{split}_ids.txt`` (one image id per line: once per image for train, once per caption for dev/test) and
  ``id_mapping.json`` (id -> image path under the image root).
- Text-based person search as IRRA reads it (``datasets/{cuhkpedes,icfgpedes,rstpreid}.py``): a JSON list of
  records ``{split, captions, file_path | img_path, id, ...}`` in ``<root>/<dataset>/``, images under
  ``<root>/<dataset>/imgs``. IVT's caption-level view of the same files (train pids re-indexed by sorting, its
  caption filters) is offered too.
- Referring datasets as the refer API (lichengunc/refer) reads them:
  ``<data_root>/<dataset>/refs(<split_by>).p`` and ``<data_root>/<dataset>/instances.json`` (COCO polygons or
  RLE), for RefCOCO / RefCOCO+ / RefCOCOg and ReferItGame (``refclef``).

Datasets return dicts of PIL images (or whatever the transform makes of them), raw texts and targets.
Tokenising is left to the caller: every Dataset takes an optional ``tokenize`` callable whose result is
returned under ``tokens``. No model code is imported here.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset, Sampler

from models.image_io import truncated_images
from training.synthetic import SHAPE_COLOURS, expression_words

Tokenize = Callable[[str], Any]
Sample = dict[str, Any]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # IRRA
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # LAPS, MagNet, ScanFormer (VG-LAW convention)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)  # IVT (and ViLT)
HALF_STD = (0.5, 0.5, 0.5)


def read_image(path: str | Path) -> Image.Image:
    """``Image.open(path).convert('RGB')`` with truncated files accepted, as every official reader sets
    ``LOAD_TRUNCATED_IMAGES`` (scoped here, so the service's strict decoding is not changed)."""
    with truncated_images(True), Image.open(path) as image:
        return image.convert("RGB")


ImageReader = Callable[[str | Path], Image.Image]


class DecodedImageCache:
    """``read_image`` that keeps every decoded image in memory until ``max_mb`` of pixels are held, for training
    on data small enough to hold decoded: on the synthetic demo data, JPEG decoding was a third to a half of
    a CPU step's data loading. Each call returns a copy, so no transform can change the cached pixels; the
    images are the ones ``read_image`` returns, so training is unchanged bit for bit. One cache per DataLoader
    worker (each holds its own)."""

    def __init__(self, max_mb: float) -> None:
        self.max_bytes = int(max_mb * 2**20)
        self.held_bytes = 0
        self.images: dict[str, Image.Image] = {}

    def __call__(self, path: str | Path) -> Image.Image:
        key = str(path)
        image = self.images.get(key)
        if image is None:
            image = read_image(path)
            size = image.width * image.height * len(image.getbands())
            if self.held_bytes + size <= self.max_bytes:
                self.images[key] = image
                self.held_bytes += size
        return image.copy()


class ResizedImageCache:
    """``to_tensor(image.resize(size, BILINEAR))`` remembered per image and size, until ``max_mb`` of float
    pixels are held (ScanFormer's demo resizes every image to the same size every epoch: resizing and converting
    were 0.5 of its 0.9 ms per sample). Keyed by a digest of the pixels, so an image that an earlier transform
    changed (e.g. its channels reordered) is a different entry. Returns the cached tensor itself: callers must
    not change it in place."""

    def __init__(self, max_mb: float) -> None:
        self.max_bytes = int(max_mb * 2**20)
        self.held_bytes = 0
        self.tensors: dict[tuple[Any, ...], torch.Tensor] = {}

    def __call__(self, image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
        key = (image.mode, image.size, size, hashlib.blake2b(image.tobytes(), digest_size=16).digest())
        pixels = self.tensors.get(key)
        if pixels is None:
            pixels = TF.to_tensor(image.resize(size, Image.Resampling.BILINEAR))
            if self.held_bytes + pixels.nbytes <= self.max_bytes:
                self.tensors[key] = pixels
                self.held_bytes += pixels.nbytes
        return pixels


def image_reader(cache_mb: float) -> ImageReader:
    """The training datasets' image reader: ``read_image``, or a :class:`DecodedImageCache` of ``cache_mb``
    (a recipe's ``image_cache_mb``; 0 = no cache, the official setting)."""
    return DecodedImageCache(cache_mb) if cache_mb > 0 else read_image


class TextCache:
    """``fn(text)`` remembered for up to ``max_items`` distinct texts (tokenising is a fifth to a third of a
    demo step's data loading, and synthetic captions repeat). ``copy`` is applied to every returned value, so
    callers may change what they get (e.g. ``torch.Tensor.clone``); the identity suits immutable values."""

    def __init__(self, fn: Callable[[str], Any], max_items: int = 100_000,
                 copy: Callable[[Any], Any] = lambda value: value) -> None:
        self.fn = fn
        self.max_items = max_items
        self.copy = copy
        self.values: dict[str, Any] = {}

    def __call__(self, text: str) -> Any:
        value = self.values.get(text)
        if value is None:
            value = self.fn(text)
            if len(self.values) < self.max_items:
                self.values[text] = value
        return self.copy(value)


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


# ==========================================================================================================
# Karpathy splits (LAPS)


@dataclass
class KarpathySplit:
    """One split of a Karpathy-format caption dataset, read as LAPS ``RawImageDataset`` reads it."""

    split: str
    captions: list[str]
    image_ids: list[int]  # the lines of {split}_ids.txt
    id_to_path: dict[str, str]

    @property
    def im_div(self) -> int:
        """Official rule: 5 captions per listed id when the two files differ in length, else 1."""
        return 5 if len(self.image_ids) != len(self.captions) else 1

    def caption_image_id(self, caption_index: int) -> int:
        return self.image_ids[caption_index // self.im_div]

    def caption_image_ids(self) -> list[int]:
        return [self.caption_image_id(i) for i in range(len(self.captions))]

    def unique_image_ids(self) -> list[int]:
        """The evaluation image list: official ``img_embs[::5]`` of the caption-level list (``evalrank``)."""
        return self.caption_image_ids()[::5]

    def image_path(self, image_root: str | Path, image_id: int) -> Path:
        return Path(image_root) / self.id_to_path[str(image_id)]


def read_karpathy_split(data_dir: str | Path, split: str) -> KarpathySplit:
    """Reads ``{split}_caps.txt``, ``{split}_ids.txt`` and ``id_mapping.json`` from ``data_dir`` (LAPS's
    ``data_path/dataset``); captions are ``line.strip()`` as in the official reader."""
    data_dir = Path(data_dir)
    with open(data_dir / f"{split}_caps.txt", encoding="utf-8") as handle:
        captions = [line.strip() for line in handle]
    with open(data_dir / f"{split}_ids.txt", encoding="utf-8") as handle:
        image_ids = [int(line.strip()) for line in handle if line.strip()]
    id_to_path = _read_json(data_dir / "id_mapping.json")
    result = KarpathySplit(split, captions, image_ids, id_to_path)
    if result.im_div == 5 and len(captions) != 5 * len(image_ids):
        raise ValueError(
            f"{split}: {len(captions)} captions for {len(image_ids)} ids; the official reader needs "
            "either one id per caption or exactly five captions per id"
        )
    return result


class KarpathyCaptionDataset(Dataset):
    """Caption-level items (LAPS ``RawImageDataset``): caption ``i`` with image ``ids[i // im_div]``.

    Returns ``{"image", "caption", "index", "img_index", "image_id"}`` (+ ``"tokens"`` when ``tokenize`` is
    given); ``index`` / ``img_index`` are the official ``ids`` / ``img_ids`` used by the loss to mask
    same-image pairs.
    """

    def __init__(self, split: KarpathySplit, image_root: str | Path, transform: Callable | None = None,
                 tokenize: Tokenize | None = None, image_reader: ImageReader = read_image) -> None:
        self.split = split
        self.image_root = Path(image_root)
        self.transform = transform
        self.tokenize = tokenize
        self.read_image = image_reader

    def __len__(self) -> int:
        return len(self.split.captions)

    def __getitem__(self, index: int) -> Sample:
        img_index = index // self.split.im_div
        image_id = self.split.image_ids[img_index]
        image = self.read_image(self.split.image_path(self.image_root, image_id))
        caption = self.split.captions[index]
        sample: Sample = {"image": self.transform(image) if self.transform else image, "caption": caption,
                          "index": index, "img_index": img_index, "image_id": image_id}
        if self.tokenize is not None:
            sample["tokens"] = self.tokenize(caption)
        return sample


# ==========================================================================================================
# Text-based person search (IRRA, IVT)


@dataclass(frozen=True)
class PersonDatasetSpec:
    annotation_file: str
    image_key: str
    irra_pid_offset: int  # IRRA: CUHK-PEDES ids start at 1 ("make pid begin from 0"), the others at 0


PERSON_DATASETS: dict[str, PersonDatasetSpec] = {
    "CUHK-PEDES": PersonDatasetSpec("reid_raw.json", "file_path", -1),
    "ICFG-PEDES": PersonDatasetSpec(
        "ICFG-PEDES.json", "file_path", 0
    ),  # the IRRA README says ICFG_PEDES.json
    "RSTPReid": PersonDatasetSpec("data_captions.json", "img_path", 0),
}


@dataclass
class PersonCaption:
    """One (image, caption) training pair, or one caption-level entry (IVT)."""

    pid: int
    image_id: int  # running index of the image record within its split
    image_path: str
    caption: str
    processed_tokens: list[str] | None = None
    attributes: dict | None = None  # IVT's ``att`` phrases when the file has them
    labels: dict | None = None  # ``training.synthetic``'s own identity labels (colours, garments; demo aids only)


@dataclass
class PersonEvalSplit:
    """IRRA's test/val dict: every image once, every caption once, each with its pid (ids not shifted)."""

    image_paths: list[str] = field(default_factory=list)
    image_pids: list[int] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    caption_pids: list[int] = field(default_factory=list)


@dataclass
class PersonAnnotations:
    name: str
    train: list[PersonCaption]
    val: PersonEvalSplit
    test: PersonEvalSplit
    num_classes: int
    records: dict[str, list[dict]]  # the raw records by split ("train", "val", "test")


def split_person_records(records: Sequence[dict]) -> dict[str, list[dict]]:
    """IRRA ``_split_anno``: 'train' and 'test' by name, every other split value goes to val."""
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for record in records:
        name = record["split"]
        splits[name if name in ("train", "test") else "val"].append(record)
    return splits


def _person_annotation_path(root: str | Path, dataset_name: str) -> tuple[PersonDatasetSpec, Path]:
    if dataset_name not in PERSON_DATASETS:
        raise ValueError(f"unknown person dataset {dataset_name!r}; choose from {sorted(PERSON_DATASETS)}")
    spec = PERSON_DATASETS[dataset_name]
    return spec, Path(root) / dataset_name / spec.annotation_file


def read_person_annotations(root: str | Path, dataset_name: str) -> PersonAnnotations:
    """IRRA's reading of CUHK-PEDES / ICFG-PEDES / RSTPReid from ``<root>/<dataset_name>/``.

    Train: one ``PersonCaption`` per (image, caption), pid = ``id + offset`` (CUHK-PEDES ``id - 1``), image_id
    = running image index; the train pids must be exactly 0..C-1 (IRRA asserts it). Val/test:
    ``PersonEvalSplit``.
    """
    spec, path = _person_annotation_path(root, dataset_name)
    image_dir = Path(root) / dataset_name / "imgs"
    splits = split_person_records(_read_json(path))
    train: list[PersonCaption] = []
    for image_id, record in enumerate(splits["train"]):
        pid = int(record["id"]) + spec.irra_pid_offset
        for caption in record["captions"]:
            train.append(PersonCaption(pid, image_id, str(image_dir / record[spec.image_key]), caption,
                                       labels=record.get("attributes")))
    train_pids = sorted({c.pid for c in train})
    if train_pids != list(range(len(train_pids))):
        raise ValueError(f"{dataset_name}: train pids must be 0..C-1 after the official offset "
                         f"({spec.irra_pid_offset:+d}); got {train_pids[:5]}...")
    evals = {}
    for name in ("val", "test"):
        split = PersonEvalSplit()
        for record in splits[name]:
            pid = int(record["id"])
            split.image_paths.append(str(image_dir / record[spec.image_key]))
            split.image_pids.append(pid)
            for caption in record["captions"]:
                split.captions.append(caption)
                split.caption_pids.append(pid)
        evals[name] = split
    return PersonAnnotations(dataset_name, train, evals["val"], evals["test"], len(train_pids), splits)


def ivt_split_words(text: str) -> list[str]:
    """IVT ``_split_word`` (rstp_reid.py): split on spaces, then a word containing '.', ',' or '?' (checked in
    that order, only the first that occurs) on that character, dropping empty pieces."""
    words: list[str] = []
    for item in text.split(" "):
        for separator in (".", ",", "?"):
            if separator in item:
                words.extend(piece for piece in item.split(separator) if piece)
                break
        else:
            words.append(item)
    return words


def ivt_filter_caption(dataset_name: str, caption: str, processed_tokens: Sequence[str] | None,
                       max_tokens: int = 90) -> str | None:
    """IVT's per-caption filter; None means the caption is dropped.

    - ICFG-PEDES: more than 90 processed tokens -> the caption is cut before the first occurrence of token #91
      (``captions.index(tok)``; where the token does not occur verbatim the official code raises, here the
      caption is kept whole).
    - RSTPReid: dropped when ``ivt_split_words`` gives more than 90 words or the caption is empty.
    - CUHK-PEDES: kept as is. Every dataset drops empty captions.
    """
    if len(caption) == 0:
        return None
    if dataset_name == "ICFG-PEDES" and processed_tokens is not None and len(processed_tokens) > max_tokens:
        position = caption.find(processed_tokens[max_tokens])
        return caption[:position] if position >= 0 else caption
    if dataset_name == "RSTPReid" and len(ivt_split_words(caption)) > max_tokens:
        return None
    return caption


def read_person_caption_level(root: str | Path, dataset_name: str,
                              apply_ivt_filters: bool = True) -> dict[str, list[PersonCaption]]:
    """IVT's caption-level lists (train / val / test) from the official annotation file.

    Every caption of an image becomes one entry, consecutively (so IVT's ``[::2]`` gallery of CUHK / RSTP
    picks each image once when it has two captions). Train pids are re-indexed by sorting the train ids
    (``id2lb``); val/test keep the raw ids.
    """
    spec, path = _person_annotation_path(root, dataset_name)
    image_dir = Path(root) / dataset_name / "imgs"
    splits = split_person_records(_read_json(path))
    train_ids = sorted({int(r["id"]) for r in splits["train"]})
    relabel = {pid: label for label, pid in enumerate(train_ids)}
    result: dict[str, list[PersonCaption]] = {}
    for name, records in splits.items():
        entries: list[PersonCaption] = []
        for image_id, record in enumerate(records):
            pid = relabel[int(record["id"])] if name == "train" else int(record["id"])
            all_tokens = record.get("processed_tokens")
            for k, caption in enumerate(record["captions"]):
                tokens = all_tokens[k] if isinstance(all_tokens, list) and k < len(all_tokens) else None
                kept = ivt_filter_caption(dataset_name, caption, tokens) if apply_ivt_filters else caption
                if kept is None:
                    continue
                entries.append(PersonCaption(pid, image_id, str(image_dir / record[spec.image_key]), kept,
                                             tokens, record.get("att"), record.get("attributes")))
        result[name] = entries
    return result


class PersonTrainDataset(Dataset):
    """(image, caption, pid) training items for IRRA (``ImageTextDataset`` / ``ImageTextMLMDataset``) and IVT
    (``ImageDatasetLevel*``: ``num_views=3`` independent augmentations of the image, for its multi-level
    alignment).

    Returns ``{"pid", "image_id", "caption", "image" | "images"}``; with ``tokenize``: ``"caption_ids"``; with
    ``mlm`` (a callable mapping token ids to (masked ids, labels), e.g. ``irra_mlm_mask``): ``"mlm_ids"`` and
    ``"mlm_labels"``. IRRA quirk: official ``caption_ids`` alias the masked ids (in-place numpy view, the
    released models were trained so), reproduced while ``caption_ids_are_masked`` is True.
    """

    def __init__(self, samples: Sequence[PersonCaption], transform: Callable | None = None,
                 tokenize: Tokenize | None = None, num_views: int = 1,
                 mlm: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
                 caption_ids_are_masked: bool = True, image_reader: ImageReader = read_image) -> None:
        if mlm is not None and tokenize is None:
            raise ValueError("mlm masking needs tokenize")
        self.samples = list(samples)
        self.transform = transform
        self.tokenize = tokenize
        self.num_views = num_views
        self.mlm = mlm
        self.caption_ids_are_masked = caption_ids_are_masked
        self.read_image = image_reader

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        entry = self.samples[index]
        image = self.read_image(entry.image_path)
        sample: Sample = {"pid": entry.pid, "image_id": entry.image_id, "caption": entry.caption}
        views = [self.transform(image) if self.transform else image for _ in range(self.num_views)]
        if self.num_views == 1:
            sample["image"] = views[0]
        else:
            sample["images"] = views
        if self.tokenize is not None:
            caption_ids = self.tokenize(entry.caption)
            sample["caption_ids"] = caption_ids
            if self.mlm is not None:
                mlm_ids, mlm_labels = self.mlm(torch.as_tensor(caption_ids).clone())
                sample["mlm_ids"], sample["mlm_labels"] = mlm_ids, mlm_labels
                if self.caption_ids_are_masked:
                    sample["caption_ids"] = mlm_ids
        return sample


class ImageListDataset(Dataset):
    """Evaluation images: ``{"image", "label", "index"}`` (gallery of person crops, or of caption images)."""

    def __init__(self, image_paths: Sequence[str | Path], labels: Sequence[int],
                 transform: Callable | None = None) -> None:
        if len(image_paths) != len(labels):
            raise ValueError("one label per image")
        self.image_paths = list(image_paths)
        self.labels = list(labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> Sample:
        image = read_image(self.image_paths[index])
        return {"image": self.transform(image) if self.transform else image, "label": self.labels[index],
                "index": index}


class TextListDataset(Dataset):
    """Evaluation texts: ``{"text", "label", "index"}`` (+ ``"tokens"`` when ``tokenize`` is given)."""

    def __init__(self, texts: Sequence[str], labels: Sequence[int], tokenize: Tokenize | None = None) -> None:
        if len(texts) != len(labels):
            raise ValueError("one label per text")
        self.texts = list(texts)
        self.labels = list(labels)
        self.tokenize = tokenize

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> Sample:
        sample: Sample = {"text": self.texts[index], "label": self.labels[index], "index": index}
        if self.tokenize is not None:
            sample["tokens"] = self.tokenize(self.texts[index])
        return sample


class RandomIdentitySampler(Sampler[int]):
    """IVT ``RandomIdentitySamplerCUHK``: batches of ``batch_size // num_instances`` identities with
    ``num_instances`` items each; identities with fewer items are sampled with replacement. Seeded per epoch
    (``set_epoch``) instead of the global RNGs, so a run is reproducible."""

    def __init__(self, pids: Sequence[int], batch_size: int, num_instances: int, seed: int = 0,
                 groups: Sequence[Any] | None = None, group_fraction: float = 0.0) -> None:
        if batch_size % num_instances:
            raise ValueError("batch_size must be a multiple of num_instances")
        self.num_instances = num_instances
        self.pids_per_batch = batch_size // num_instances
        self.index_by_pid: dict[int, list[int]] = defaultdict(list)
        for index, pid in enumerate(pids):
            self.index_by_pid[int(pid)].append(index)
        self.seed = seed
        self.epoch = 0
        self.length = sum(max(len(v), num_instances) // num_instances * num_instances
                          for v in self.index_by_pid.values())
        # demo aid (not IVT's): ``groups`` gives each item a group key (the same for all items of an identity);
        # then about ``group_fraction`` of each batch's identities share the group of its first identity
        self.group_of_pid = {int(pid): group for pid, group in zip(pids, groups, strict=True)} if groups else {}
        self.same_group = max(0, round(group_fraction * self.pids_per_batch) - 1) if groups else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        rng = random.Random(self.seed * 100003 + self.epoch)
        chunks: dict[int, list[list[int]]] = {}
        for pid, indices in self.index_by_pid.items():
            pool = list(indices)
            if len(pool) < self.num_instances:
                pool = [rng.choice(indices) for _ in range(self.num_instances)]
            rng.shuffle(pool)
            usable = len(pool) // self.num_instances * self.num_instances
            chunks[pid] = [pool[i:i + self.num_instances] for i in range(0, usable, self.num_instances)]
        available = [pid for pid in self.index_by_pid if chunks[pid]]
        order: list[int] = []
        while len(available) >= self.pids_per_batch:
            batch = rng.sample(available, self.pids_per_batch) if not self.same_group else self._grouped(available, rng)
            for pid in batch:
                order.extend(chunks[pid].pop(0))
                if not chunks[pid]:
                    available.remove(pid)
        return iter(order)

    def _grouped(self, available: list[int], rng: random.Random) -> list[int]:
        """A batch whose first identity brings up to ``same_group`` others of its group; the rest at random."""
        first = rng.choice(available)
        group = self.group_of_pid[first]
        mates = [pid for pid in available if pid != first and self.group_of_pid[pid] == group]
        batch = [first, *rng.sample(mates, min(self.same_group, len(mates)))]
        chosen = set(batch)
        others = [pid for pid in available if pid not in chosen]
        return batch + rng.sample(others, self.pids_per_batch - len(batch))

    def __len__(self) -> int:
        return self.length


def identity_epoch_order(samples: Sequence[PersonCaption], batch_size: int, num_instances: int, seed: int,
                         epoch: int, shared_colour_fraction: float = 0.0) -> list[int]:
    """One epoch of :class:`RandomIdentitySampler` over person training items (IVT's sampler; IRRA's
    ``sampler identity``). ``shared_colour_fraction`` > 0 (a demo aid) groups identities by the (upper, lower)
    clothing colours ``training.synthetic`` records in each item's ``labels``."""
    groups = None
    if shared_colour_fraction:
        if any(not s.labels or "upper_colour" not in s.labels for s in samples):
            raise ValueError("shared_colour_fraction needs the clothing colours training.synthetic writes "
                             "into each record ('attributes')")
        groups = [(s.labels["upper_colour"], s.labels["lower_colour"]) for s in samples]
    sampler = RandomIdentitySampler([s.pid for s in samples], batch_size, num_instances, seed, groups,
                                    shared_colour_fraction)
    sampler.set_epoch(epoch)
    return list(sampler)


# ==========================================================================================================
# Referring datasets (MagNet, ScanFormer)

REFER_IMAGE_DIRS: dict[str, str] = {
    "refcoco": "images/mscoco/images/train2014",
    "refcoco+": "images/mscoco/images/train2014",
    "refcocog": "images/mscoco/images/train2014",
    "refclef": "images/saiapr_tc-12",  # ReferItGame
}


class _RefsUnpickler(pickle.Unpickler):
    """Refs pickles hold only lists, dicts, strings and numbers: every global is refused (no code runs)."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"refs pickle refers to {module}.{name}; only plain containers are allowed"
        )


def load_refs_pickle(path: str | Path) -> list[dict]:
    """``refs(<split_by>).p``; the files were written by Python 2, whose byte strings decode as latin-1."""
    with open(path, "rb") as handle:
        return _RefsUnpickler(handle, encoding="latin1").load()


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """refer API ``getMask``: decode polygons / RLE and **sum** over the parts (uint8 [H, W]); overlapping
    parts therefore count 2 or more (see ``ReferAnnotations.ref_mask``)."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list) and segmentation and isinstance(segmentation[0], list):
        rles = mask_utils.frPyObjects(segmentation, height, width)  # polygons
    else:
        parts = segmentation if isinstance(segmentation, list) else [segmentation]
        rles = []
        for part in parts:
            if isinstance(part.get("counts"), list):  # uncompressed RLE
                rles.append(mask_utils.frPyObjects(part, height, width))
            else:
                counts = part["counts"]
                rles.append({"size": part["size"], "counts": counts.encode("ascii") if isinstance(counts, str)
                             else counts})
    decoded = mask_utils.decode(rles)
    if decoded.ndim == 2:
        decoded = decoded[:, :, None]
    return np.sum(decoded, axis=2).astype(np.uint8)


@dataclass
class ReferAnnotations:
    """The refer API's index over one dataset / split_by."""

    dataset: str
    split_by: str
    refs: list[dict]
    images: dict[int, dict]
    annotations: dict[int, dict]
    categories: dict[int, str]
    image_dir: Path
    refs_by_id: dict[int, dict] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.refs_by_id = {r["ref_id"]: r for r in self.refs}

    def ref_ids(self, split: str = "") -> list[int]:
        """refer API ``getRefIds(split=...)``: testA/testB/testC match by the letter (so 'testAB' counts for
        both), 'test' matches every split containing 'test', train/val match exactly, '' gives all refs; any
        other name (not in the official API) matches exactly."""
        if not split:
            chosen = self.refs
        elif split in ("testA", "testB", "testC"):
            chosen = [r for r in self.refs if split[-1] in r["split"]]
        elif split == "test":
            chosen = [r for r in self.refs if "test" in r["split"]]
        else:
            chosen = [r for r in self.refs if r["split"] == split]
        return [r["ref_id"] for r in chosen]

    def image_path(self, ref: dict) -> Path:
        return self.image_dir / self.images[ref["image_id"]]["file_name"]

    def ref_box_xyxy(self, ref: dict) -> np.ndarray:
        """The annotation's COCO ``bbox`` (x, y, w, h) as (x1, y1, x2, y2), float32, original pixels."""
        x, y, w, h = self.annotations[ref["ann_id"]]["bbox"]
        return np.array([x, y, x + w, y + h], dtype=np.float32)

    def ref_mask_sum(self, ref: dict) -> np.ndarray:
        """refer API ``getMask(ref)['mask']``: the per-part masks summed (uint8)."""
        image = self.images[ref["image_id"]]
        return decode_segmentation(
            self.annotations[ref["ann_id"]]["segmentation"], image["height"], image["width"]
        )

    def ref_mask(self, ref: dict) -> np.ndarray:
        """LAVT / MagNet ground truth (``dataset_refer_bert.py``): ``annot[mask == 1] = 1``, so pixels covered
        by two or more polygon parts are background. uint8 {0, 1} [H, W]."""
        return (self.ref_mask_sum(ref) == 1).astype(np.uint8)


def read_refer(data_root: str | Path, dataset: str = "refcoco", split_by: str = "unc",
               image_dir: str | Path | None = None) -> ReferAnnotations:
    """Loads ``<data_root>/<dataset>/refs(<split_by>).p`` and ``instances.json`` as the refer API does. Images
    are in ``<data_root>/images/mscoco/images/train2014`` (RefCOCO family),
    ``<data_root>/images/saiapr_tc-12`` (refclef) or, for other dataset names (e.g. the synthetic
    ``refsynth``), ``<data_root>/images/<dataset>``."""
    data_root = Path(data_root)
    refs = load_refs_pickle(data_root / dataset / f"refs({split_by}).p")
    instances = _read_json(data_root / dataset / "instances.json")
    if image_dir is None:
        image_dir = data_root / REFER_IMAGE_DIRS.get(dataset, f"images/{dataset}")
    return ReferAnnotations(
        dataset=dataset, split_by=split_by, refs=refs,
        images={img["id"]: img for img in instances["images"]},
        annotations={ann["id"]: ann for ann in instances["annotations"]},
        categories={cat["id"]: cat["name"] for cat in instances["categories"]},
        image_dir=Path(image_dir),
    )


class ReferDataset(Dataset):
    """Referring items over one split.

    ``unit="ref"``: one item per ref with one sentence drawn at random each time (LAVT / MagNet training,
    ``np.random.choice`` over the ref's sentences; here ``torch.randint``, seeded per DataLoader worker);
    ``unit="sentence"``: one item per sentence (evaluation, and VG-LAW-style REC training).

    Returns ``{"image", "text", "box_xyxy", "mask", "ref_id", "sent_id", "image_id", "category_id",
    "orig_size"}`` (``mask``: the LAVT rule of ``ReferAnnotations.ref_mask``; omitted with
    ``with_mask=False``), then applies ``transform(sample) -> sample``; ``tokenize`` is applied to the final
    text (after a transform that may rewrite it, e.g. the left/right swap of a flip) and stored as
    ``"tokens"``.
    """

    def __init__(
        self,
        refer: ReferAnnotations,
        split: str,
        unit: str = "ref",
        transform: Callable | None = None,
        tokenize: Tokenize | None = None,
        text_field: str = "raw",
        with_mask: bool = True,
        image_reader: ImageReader = read_image,
    ) -> None:
        if unit not in ("ref", "sentence"):
            raise ValueError("unit must be 'ref' or 'sentence'")
        self.refer = refer
        self.split = split
        self.unit = unit
        self.transform = transform
        self.tokenize = tokenize
        self.text_field = (
            text_field  # MagNet feeds sentence['raw']; VG-LAW's preprocessing keeps sentence['sent']
        )
        self.with_mask = with_mask
        self.read_image = image_reader
        self.ref_ids = refer.ref_ids(split)
        refs = refer.refs_by_id
        self.items: list[tuple[int, int | None]] = []
        for ref_id in self.ref_ids:
            if unit == "ref":
                self.items.append((ref_id, None))
            else:
                self.items.extend((ref_id, k) for k in range(len(refs[ref_id]["sentences"])))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        ref_id, sentence_index = self.items[index]
        ref = self.refer.refs_by_id[ref_id]
        if sentence_index is None:
            sentence_index = int(torch.randint(len(ref["sentences"]), ()).item())
        sentence = ref["sentences"][sentence_index]
        image = self.read_image(self.refer.image_path(ref))
        sample: Sample = {
            "image": image, "text": sentence[self.text_field], "box_xyxy": self.refer.ref_box_xyxy(ref),
            "ref_id": ref_id, "sent_id": sentence.get("sent_id", sentence_index), "image_id": ref["image_id"],
            "category_id": ref.get("category_id"), "orig_size": (image.height, image.width),
        }
        if self.with_mask:
            sample["mask"] = self.refer.ref_mask(ref)
        if self.transform is not None:
            sample = self.transform(sample)
        if self.tokenize is not None:
            sample["tokens"] = self.tokenize(sample["text"])
        return sample


# ==========================================================================================================
# Official train-time augmentation (and the matching test transforms), one named factory per method


def irra_train_transform(img_size: tuple[int, int] = (384, 128), img_aug: bool = True) -> T.Compose:
    """IRRA ``build_transforms(is_train=True)`` (datasets/build.py). With ``--img_aug`` (the released runs):
    Resize((H, W)) -> RandomHorizontalFlip(0.5) -> Pad(10) -> RandomCrop((H, W)) -> ToTensor ->
    Normalize(CLIP) -> RandomErasing(scale=(0.02, 0.4), value=CLIP mean) (after normalising, so the fill is
    the raw mean)."""
    if not img_aug:
        return T.Compose([T.Resize(img_size), T.RandomHorizontalFlip(0.5), T.ToTensor(),
                          T.Normalize(CLIP_MEAN, CLIP_STD)])
    return T.Compose([
        T.Resize(img_size), T.RandomHorizontalFlip(0.5), T.Pad(10), T.RandomCrop(img_size), T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD), T.RandomErasing(scale=(0.02, 0.4), value=list(CLIP_MEAN)),
    ])


def irra_test_transform(img_size: tuple[int, int] = (384, 128)) -> T.Compose:
    """IRRA test: Resize((H, W)) bilinear (PIL, antialiased), ToTensor, Normalize(CLIP)."""
    return T.Compose([T.Resize(img_size), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def ivt_train_transform(img_size: tuple[int, int] = (384, 128)) -> T.Compose:
    """IVT ``make_dataloader_vl_*`` train: Resize(bicubic) -> Pad(10) -> RandomCrop ->
    RandomHorizontalFlip(0.5) -> ToTensor -> Normalize(0.5, 0.5) -> timm RandomErasing(probability=0.5,
    mode='pixel', max_count=1) (per-pixel N(0, 1) fill, area 0.02-1/3, aspect 0.3-3.3). The dataset applies it
    three times per item (``num_views=3``)."""
    from timm.data.random_erasing import RandomErasing

    return T.Compose([
        T.Resize(img_size, interpolation=T.InterpolationMode.BICUBIC), T.Pad(10), T.RandomCrop(img_size),
        T.RandomHorizontalFlip(0.5), T.ToTensor(), T.Normalize(HALF_MEAN, HALF_STD),
        RandomErasing(probability=0.5, mode="pixel", max_count=1, device="cpu"),
    ])


def ivt_test_transform(img_size: tuple[int, int] = (384, 128)) -> T.Compose:
    """IVT test: Resize (bilinear), ToTensor, Normalize(0.5, 0.5)."""
    return T.Compose([T.Resize(img_size), T.ToTensor(), T.Normalize(HALF_MEAN, HALF_STD)])


def laps_train_transform(img_size: int = 224) -> T.Compose:
    """LAPS ``build_transforms(is_train=True)``: RandomResizedCrop(224, scale=(0.6, 1.0), bicubic) ->
    RandomHorizontalFlip() -> ToTensor -> Normalize(ImageNet) (ViT and Swin alike)."""
    return T.Compose([
        T.RandomResizedCrop(img_size, scale=(0.6, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def laps_test_transform(img_size: int = 224) -> T.Compose:
    """LAPS test: Resize((224, 224), bicubic) squash, ToTensor, Normalize(ImageNet)."""
    return T.Compose([T.Resize((img_size, img_size), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class MagnetTransform:
    """LAVT / MagNet ``get_transform``: Resize both to (S, S) (image bilinear, mask NEAREST), ToTensor,
    Normalize(ImageNet); the mask becomes an int64 tensor. The official training uses no other augmentation,
    so the same transform serves train and test (MagNet's own recipe is unpublished; LAVT's is this)."""

    def __init__(self, img_size: int = 480) -> None:
        self.img_size = img_size

    def __call__(self, sample: Sample) -> Sample:
        size = [self.img_size, self.img_size]
        out = dict(sample)
        out["image"] = TF.normalize(
            TF.to_tensor(TF.resize(sample["image"], size)), IMAGENET_MEAN, IMAGENET_STD
        )
        if "mask" in sample:
            mask = Image.fromarray(np.asarray(sample["mask"], dtype=np.uint8), mode="L")
            mask = TF.resize(mask, size, interpolation=T.InterpolationMode.NEAREST)
            out["mask"] = torch.as_tensor(np.array(mask), dtype=torch.int64)
        return out


def magnet_train_transform(img_size: int = 480) -> MagnetTransform:
    return MagnetTransform(img_size)


def magnet_test_transform(img_size: int = 480) -> MagnetTransform:
    return MagnetTransform(img_size)


class GrayscaleWithoutColourWords:
    """Demo-only augmentation (no official recipe has it): with ``probability``, a sample whose expression names
    no colour gets a grayscale image before ``inner``. The expression still singles the referent out (it never
    relied on colour), no colour-shape combination is created, and the model must find shapes and sizes by
    their outlines instead of through the colours they had in training."""

    def __init__(self, inner: Callable[[Sample], Sample], probability: float, colour_words: Sequence[str]) -> None:
        self.inner = inner
        self.probability = probability
        self.colour_words = frozenset(colour_words)

    def __call__(self, sample: Sample) -> Sample:
        if not expression_words(sample["text"]) & self.colour_words and float(torch.rand(())) < self.probability:
            sample = {**sample, "image": sample["image"].convert("L").convert("RGB")}
        return self.inner(sample)


class PermuteChannelsWithoutColourWords:
    """Demo-only augmentation (no official recipe has it): a sample whose expression names no colour gets its RGB
    channels in a random order (each of the 6 orders equally likely, the identity included) before ``inner``.
    The expression never relied on colour, so it still singles the referent out; the shapes appear in other
    hues while the image stays in colour (unlike :class:`GrayscaleWithoutColourWords`, whose grey images never
    occur at test time), so shapes, sizes and places must be found apart from the colours they had in
    training."""

    ORDERS: tuple[tuple[int, int, int], ...] = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))

    def __init__(self, inner: Callable[[Sample], Sample], colour_words: Sequence[str]) -> None:
        self.inner = inner
        self.colour_words = frozenset(colour_words)

    def __call__(self, sample: Sample) -> Sample:
        if not expression_words(sample["text"]) & self.colour_words:
            order = self.ORDERS[int(torch.randint(len(self.ORDERS), ()))]
            if order != (0, 1, 2):
                bands = sample["image"].convert("RGB").split()
                sample = {**sample, "image": Image.merge("RGB", [bands[i] for i in order])}
        return self.inner(sample)


def demo_colour_free_augmentation(transform: Callable[[Sample], Sample], grayscale_probability: float,
                                  permute_channels: bool = False) -> Callable[[Sample], Sample]:
    """``transform`` behind the demo's augmentations for expressions that name no colour (the synthetic
    generator's colour words): :class:`PermuteChannelsWithoutColourWords` when ``permute_channels``, and
    :class:`GrayscaleWithoutColourWords` (outermost) when ``grayscale_probability`` > 0. With neither (every
    official preset) it is ``transform`` itself."""
    if permute_channels:
        transform = PermuteChannelsWithoutColourWords(transform, tuple(SHAPE_COLOURS))
    if grayscale_probability > 0:
        transform = GrayscaleWithoutColourWords(transform, grayscale_probability, tuple(SHAPE_COLOURS))
    return transform


DIRECTION_WORDS: tuple[str, ...] = ("left", "right", "top", "bottom", "middle")


def swap_left_right(text: str) -> str:
    """VG-LAW flip: every 'left' becomes 'right' and vice versa, as substrings (so 'leftover' changes too)."""
    return text.replace("right", "\0").replace("left", "right").replace("\0", "left")


class ScanformerTransform:
    """REC augmentation for ScanFormer. No official code exists; this is the pipeline of the first author's
    VG-LAW (dcdcvgroup/vglaw-mindspore ``src/transforms.py`` + ``dataset.py``), the most probable template:

    train: RandomResize (longest side drawn from S + 32k, k in -4..4, with ``multi_scale``; set back to S when
    the text has a direction word and the size exceeds S, or when the box would exceed S) -> RandomCrop to at
    most S x S keeping the box (skipped for direction words) -> RandomHorizontalFlip(0.5) swapping
    'left'/'right' in the text -> ToTensor -> Normalize -> zero-pad to S x S at a random offset
    (``translate``) or centred. test: longest side resized to S, Normalize, centred pad.

    Adds ``image`` [3, S, S], ``pixel_mask`` [S, S] int64 (1 on the image), ``box_xyxy`` (pixels of the padded
    canvas), ``box_cxcywh`` (normalised by S, the regression target), ``text``, ``mask`` (padded, when
    present) and ``affine`` = (ax, bx, ay, by) with ``canvas_x = ax * x + bx``, ``canvas_y = ay * y + by`` for
    original pixel coordinates (ax < 0 after a flip), to map a predicted box back.
    """

    def __init__(
        self,
        img_size: int = 512,
        train: bool = True,
        multi_scale: bool = True,
        translate: bool = True,
        flip_prob: float = 0.5,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        resized_cache: ResizedImageCache | None = None,
    ) -> None:
        self.img_size = img_size
        self.resized_cache = resized_cache
        self.train = train
        self.sizes = [img_size + 32 * k for k in range(-4, 5)] if (train and multi_scale) else [img_size]
        self.translate = translate and train
        self.flip_prob = flip_prob if train else 0.0
        self.mean = tuple(mean)
        self.std = tuple(std)

    @staticmethod
    def has_direction_word(text: str) -> bool:
        """VG-LAW's test: a substring match, so 'topmost' or 'leftover' count."""
        return any(word in text for word in DIRECTION_WORDS)

    def __call__(self, sample: Sample) -> Sample:
        S = self.img_size
        image: Image.Image = sample["image"]
        text: str = sample["text"]
        box = np.asarray(sample["box_xyxy"], dtype=np.float64).copy()
        mask_image = None
        if sample.get("mask") is not None:
            mask_image = Image.fromarray(np.asarray(sample["mask"], dtype=np.uint8), mode="L")
        directional = self.has_direction_word(text)

        # RandomResize: the longest side becomes `size` (bilinear image, nearest mask).
        size = self.sizes[int(torch.randint(len(self.sizes), ()).item())]
        if directional and size > S:
            size = S
        width, height = image.size
        scale = size / max(width, height)
        if ((box[2:] - box[:2]) * scale > S).any():
            scale = S / max(width, height)
        new_w, new_h = round(width * scale), round(height * scale)
        # With a resized-image cache, no mask and a resized image within the canvas (no shrinking below), the
        # pixels stay a [3, h, w] tensor in [0, 1] from here on: crop, flip and normalise act on each pixel
        # alone, so the canvas is the one of the PIL path bit for bit.
        pixels = None
        if self.resized_cache is not None and mask_image is None and max(new_w, new_h) <= S:
            pixels = self.resized_cache(image, (new_w, new_h))
        else:
            image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        if mask_image is not None:
            mask_image = mask_image.resize((new_w, new_h), Image.Resampling.NEAREST)
        width, height = new_w, new_h
        box *= scale
        shift_x = shift_y = 0.0  # canvas = scale * original + shift, before flip and pad

        # RandomCrop to at most S x S containing the (rounded) box.
        if self.train and not directional:
            crop_w, crop_h = min(new_w, S), min(new_h, S)
            x1, y1, x2, y2 = (round(v) for v in box)
            max_x, max_y = min(x1, new_w - crop_w), min(y1, new_h - crop_h)
            min_x, min_y = max(0, x2 - crop_w), max(0, y2 - crop_h)
            if max_x >= min_x and max_y >= min_y:
                crop_x = int(torch.randint(min_x, max_x + 1, ()).item())
                crop_y = int(torch.randint(min_y, max_y + 1, ()).item())
                region = (crop_x, crop_y, crop_x + crop_w, crop_y + crop_h)
                if pixels is not None:
                    pixels = pixels[:, crop_y:crop_y + crop_h, crop_x:crop_x + crop_w]
                else:
                    image = image.crop(region)
                if mask_image is not None:
                    mask_image = mask_image.crop(region)
                width, height = crop_w, crop_h
                box = np.clip(box - [crop_x, crop_y, crop_x, crop_y], 0, [crop_w, crop_h, crop_w, crop_h])
                shift_x, shift_y = -float(crop_x), -float(crop_y)
        if max(width, height) > S:  # only reachable through rounding; VG-LAW would fail to pad, here we shrink
            fit = S / max(width, height)
            image = image.resize((min(S, round(width * fit)), min(S, round(height * fit))),
                                 Image.Resampling.BILINEAR)
            if mask_image is not None:
                mask_image = mask_image.resize(image.size, Image.Resampling.NEAREST)
            width, height = image.size
            box *= fit
            scale, shift_x, shift_y = scale * fit, shift_x * fit, shift_y * fit

        ax, bx, ay, by = scale, shift_x, scale, shift_y
        if self.flip_prob and float(torch.rand(())) < self.flip_prob:
            if pixels is not None:
                pixels = pixels.flip(-1)
            else:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if mask_image is not None:
                mask_image = mask_image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            box = np.array([width - box[2], box[1], width - box[0], box[3]])
            text = swap_left_right(text)
            ax, bx = -ax, width - bx

        # Normalise and pad into the S x S canvas.
        if self.translate:
            pad_y = int(torch.randint(0, S - height + 1, ()).item())
            pad_x = int(torch.randint(0, S - width + 1, ()).item())
        else:
            pad_y, pad_x = (S - height) // 2, (S - width) // 2
        canvas = torch.zeros(3, S, S)
        canvas[:, pad_y : pad_y + height, pad_x : pad_x + width] = TF.normalize(
            TF.to_tensor(image) if pixels is None else pixels, self.mean, self.std
        )
        pixel_mask = torch.zeros(S, S, dtype=torch.int64)
        pixel_mask[pad_y:pad_y + height, pad_x:pad_x + width] = 1
        box = box + [pad_x, pad_y, pad_x, pad_y]
        cxcywh = (
            np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0], box[3] - box[1]]) / S
        )

        out = dict(sample)
        out.update(image=canvas, pixel_mask=pixel_mask, text=text,
                   box_xyxy=torch.as_tensor(box, dtype=torch.float32),
                   box_cxcywh=torch.as_tensor(cxcywh, dtype=torch.float32),
                   affine=(ax, bx + pad_x, ay, by + pad_y))
        if mask_image is not None:
            padded = torch.zeros(S, S, dtype=torch.int64)
            padded[pad_y:pad_y + height, pad_x:pad_x + width] = torch.as_tensor(np.array(mask_image),
                                                                                dtype=torch.int64)
            out["mask"] = padded
        return out


def canvas_box_to_original(box_xyxy: Sequence[float], affine: Sequence[float]) -> np.ndarray:
    """Inverse of ``ScanformerTransform``'s ``affine`` for a box (x1, y1, x2, y2) on the canvas."""
    ax, bx, ay, by = affine
    xs = sorted(((box_xyxy[0] - bx) / ax, (box_xyxy[2] - bx) / ax))
    ys = sorted(((box_xyxy[1] - by) / ay, (box_xyxy[3] - by) / ay))
    return np.array([xs[0], ys[0], xs[1], ys[1]], dtype=np.float32)


def scanformer_train_transform(img_size: int = 512, multi_scale: bool = True, translate: bool = True,
                               mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                               flip_prob: float = 0.5, resized_cache_mb: float = 0) -> ScanformerTransform:
    """``resized_cache_mb`` > 0 keeps the resized images as tensors (:class:`ResizedImageCache`): the same
    samples bit for bit; 0 (the official presets) resizes every time."""
    return ScanformerTransform(img_size, train=True, multi_scale=multi_scale, translate=translate,
                               flip_prob=flip_prob, mean=mean, std=std,
                               resized_cache=ResizedImageCache(resized_cache_mb) if resized_cache_mb > 0 else None)


def scanformer_test_transform(img_size: int = 512, mean: Sequence[float] = IMAGENET_MEAN,
                              std: Sequence[float] = IMAGENET_STD) -> ScanformerTransform:
    return ScanformerTransform(img_size, train=False, mean=mean, std=std)


# ==========================================================================================================
# Official train-time text corruption (token level; the tokenizer stays with the caller)


def irra_mlm_mask(token_ids: torch.Tensor, rng: random.Random | None = None, mask_id: int = 49405,
                  vocab_end: int = 49405) -> tuple[torch.Tensor, torch.Tensor]:
    """IRRA ``_build_random_masked_tokens_and_labels`` (datasets/bases.py). Each token with ``0 < id < 49405``
    (not pad, mask, SOT, EOT) is selected with p = 0.15; a selected token gets label = its id and becomes the
    mask (80%), a random id in 1..49404 (10%) or stays (10%). If nothing was selected, position 1 is forced to
    the mask. Python ``random`` is drawn in the official order (one ``random()`` per eligible token, one
    ``choice`` per random replacement). Returns (masked ids, labels), labels 0 where ignored."""
    rng = rng if rng is not None else random  # type: ignore[assignment]
    tokens = [int(t) for t in token_ids.tolist()]
    labels: list[int] = []
    replacement_range = range(1, vocab_end)
    for i, token in enumerate(tokens):
        if 0 < token < vocab_end:
            prob = rng.random()
            if prob < 0.15:
                prob /= 0.15
                if prob < 0.8:
                    tokens[i] = mask_id
                elif prob < 0.9:
                    tokens[i] = rng.choice(replacement_range)
                labels.append(token)
            else:
                labels.append(0)
        else:
            labels.append(0)
    if all(label == 0 for label in labels):
        labels[1] = tokens[1]
        tokens[1] = mask_id
    return torch.tensor(tokens, dtype=token_ids.dtype), torch.tensor(labels, dtype=token_ids.dtype)


def _ivt_sentence_pieces(sentence: str) -> list[str]:
    """IVT ``split_txt`` inner step: the longest comma chunk and the other chunks re-joined, if > 5 chars."""
    chunks = sentence.split(",")
    longest = int(np.argmax([len(c) for c in chunks]))
    rest = (",".join(chunks[:longest]) + "," + ",".join(chunks[longest + 1:])).strip(",")
    return [piece for piece in (chunks[longest], rest) if len(piece) > 5]


def ivt_phrase_candidates(caption: str, strip_brackets: bool = True) -> list[str]:
    """IVT phrase-level pieces of a caption (``get_phrase_level_txt`` with brackets stripped; the CUHK
    word-level fallback ``split_txt`` without)."""
    text = caption.strip(".")
    if strip_brackets:
        text = text.strip("[").strip("]")
    pieces: list[str] = []
    for sentence in text.split("."):
        pieces.extend(_ivt_sentence_pieces(sentence))
    return [p.strip(" ") for p in pieces if len(p) > 0]


def ivt_phrase_level_text(caption: str, rng: random.Random | None = None) -> str:
    """IVT multi-level alignment, phrase level (processor.py ``get_phrase_level_txt``): one random piece.
    Where a caption yields no piece (the official code would fail), the caption itself is returned."""
    rng = rng if rng is not None else random  # type: ignore[assignment]
    pieces = ivt_phrase_candidates(caption)
    return rng.choice(pieces) if pieces else caption


def ivt_word_level_text(caption: str, dataset_name: str, rng: random.Random | None = None,
                        attributes: dict | None = None) -> str:
    """IVT multi-level alignment, "word" level (bases.py ``ImageDatasetLevel*``), on the lower-cased caption.

    CUHK-PEDES: a random non-empty subset of the ``att`` phrases joined with ',' when the record has them,
    else one random ``split_txt`` piece. ICFG-PEDES / RSTPReid: one random comma chunk longer than 5
    characters. Falls back to the caption when nothing qualifies (the official code would fail or return
    '')."""
    rng = rng if rng is not None else random  # type: ignore[assignment]
    caption = caption.lower()
    if dataset_name == "CUHK-PEDES":
        if attributes:
            keys = list(attributes.keys())
            chosen = rng.sample(keys, rng.randint(1, len(keys)))
            word = ",".join(attributes[k] for k in chosen)
        else:
            pieces = ivt_phrase_candidates(caption, strip_brackets=False)
            word = rng.choice(pieces) if pieces else caption
        return word or caption
    text = caption.strip(".").strip("[").strip("]")
    pieces = [chunk for sentence in text.split(".") for chunk in sentence.split(",") if len(chunk) > 5]
    pieces = [p.strip(" ") for p in pieces if len(p) > 0]
    return rng.choice(pieces) if pieces else caption


def laps_size_augment(word_pieces: Sequence[Sequence[str]], vocab: Sequence[str], train: bool = True,
                      mask_rate: float = 0.2, rng: random.Random | None = None) -> list[str]:
    """LAPS ``process_caption_bert`` on pre-split words: ``word_pieces[i]`` are the WordPiece tokens of basic
    word i. In training each word is altered with p = 0.2: all its pieces become [MASK] (50%), random
    vocabulary tokens (10%) or are deleted (40%). Returns ``['[CLS]', ..., '[SEP]']`` (convert to ids with the
    tokenizer)."""
    rng = rng if rng is not None else random  # type: ignore[assignment]
    output: list[str] = []
    for pieces in word_pieces:
        prob = rng.random()
        if train and prob < mask_rate:
            prob /= mask_rate
            if prob < 0.5:
                output.extend("[MASK]" for _ in pieces)
            elif prob < 0.6:
                output.extend(rng.choice(vocab) for _ in pieces)
            # else: deleted
        else:
            output.extend(pieces)
    return ["[CLS]", *output, "[SEP]"]


def bert_word_pieces(text: str, tokenizer: Any) -> list[list[str]]:
    """Basic words and their WordPiece tokens with a transformers BERT tokenizer (lower-casing, punctuation
    split), the input ``laps_size_augment`` expects. For ordinary captions the concatenation equals
    ``tokenize(text)``."""
    normalizer = tokenizer.backend_tokenizer.normalizer
    pre_tokenizer = tokenizer.backend_tokenizer.pre_tokenizer
    normalized = normalizer.normalize_str(text) if normalizer is not None else text
    words = (
        [w for w, _ in pre_tokenizer.pre_tokenize_str(normalized)] if pre_tokenizer else normalized.split()
    )
    return [tokenizer.tokenize(w) for w in words]

