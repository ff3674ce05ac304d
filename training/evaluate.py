"""One evaluation CLI with each method's official metric definitions: ``python -m training.evaluate --help``.

    person  IRRA / IVT on CUHK-PEDES, ICFG-PEDES or RSTPReid test (or val): R1/R5/R10/mAP/mINP.
            IRRA: the official ``rank`` over all test captions x all test images.
            IVT: the standard unique-gallery protocol by default; ``--ivt-official`` gives the official
            IVT evaluator (CUHK/RSTP ``[::2]`` gallery, trapezoidal AP) to compare with IVT's own logs.
    caption LAPS on a Karpathy split: exact LAPS scores of every image x caption, ``evalrank``'s R@K / rsum.
    box     ScanFormer on a refer split: Acc@0.5 (IoU of the predicted and the annotated box >= 0.5).
    mask    MagNet on a refer split: mIoU / oIoU / prec@X as the official ``test.py`` (at the model's S x S).
    demo    every model of ``weights/demo/manifest.json`` on its held-out synthetic split, next to chance;
            ``--by-cue`` adds ScanFormer's and MagNet's figures per expression cue (location, colour, size,
            other), as ``box`` / ``mask`` do with the same flag.

Every metric is printed in a table like the papers' (percentages, two decimals).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from training.datasets import PERSON_DATASETS, read_image, read_person_annotations
from training.synthetic import LOCATION_PHRASES, SHAPE_COLOURS, SIZE_WORDS, expression_words


def encode_in_batches(fn: Any, items: list[Any], batch_size: int, desc: str, load: Any = None) -> np.ndarray:
    out = []
    for start in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch"):
        chunk = items[start:start + batch_size]
        out.append(fn([load(x) for x in chunk] if load else chunk))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def person_model(method: str, checkpoint: Path | None, precision: str, device: str) -> Any:
    if method == "irra":
        from models.irra import IRRARetrievalModel as adapter
    elif method == "ivt":
        from models.ivt import IVTRetrievalModel as adapter
    else:
        raise ValueError(f"{method} is not a person-search method")
    if checkpoint is None:
        return adapter.from_config(None, device=device, precision=precision)
    return adapter.from_checkpoint(checkpoint, device=device, precision=precision)


def evaluate_person(args: argparse.Namespace, model: Any = None) -> dict[str, float]:
    annotations = read_person_annotations(args.root, args.dataset)
    split = annotations.test if args.split == "test" else annotations.val
    model = model or person_model(args.method, args.checkpoint, args.precision, args.device)
    image_feats = encode_in_batches(model.encode_images, split.image_paths, args.batch_size, "images", read_image)
    text_feats = encode_in_batches(model.encode_texts, split.captions, args.batch_size, "captions")
    if args.method == "ivt":
        from training.ivt_metrics import evaluate_ivt

        # caption-level rows: each caption paired with its own image's feature and that image's id
        owner = np.repeat(np.arange(len(split.image_paths)),
                          [len(r["captions"]) for r in annotations.records[args.split]])
        result = evaluate_ivt(image_feats[owner], text_feats, np.asarray(split.caption_pids), owner,
                              official=args.ivt_official, paired_gallery=args.dataset != "ICFG-PEDES")
        return {k: 100.0 * v for k, v in result.as_dict().items()}
    from training.person_metrics import evaluate_t2i

    return evaluate_t2i(text_feats, image_feats, np.asarray(split.caption_pids), np.asarray(split.image_pids))


def chance_person_r1(caption_pids: list[int], image_pids: list[int]) -> float:
    """Expected R@1 of a random ranking: the fraction of gallery images sharing the query's id, averaged."""
    gallery = np.asarray(image_pids)
    return float(np.mean([np.mean(gallery == pid) for pid in caption_pids])) * 100.0


# ------------------------------------------------------------------------------------------ caption (LAPS)


def evaluate_caption(model: Any, data_root: Path, dataset: str = "synth", split: str = "test",
                     batch_size: int = 64) -> dict[str, float]:
    """LAPS ``evalrank`` on ``<data_root>/<dataset>/{split}_*`` with images under ``<data_root>/images``:
    exact LAPS scores [images, captions], caption j belongs to image j // 5."""
    from training.datasets import read_karpathy_split
    from training.eval_laps import encode_captions, encode_images
    from training.laps_metrics import evaluate_sims

    karpathy = read_karpathy_split(Path(data_root) / dataset, split)
    paths = [karpathy.image_path(Path(data_root) / "images", i) for i in karpathy.unique_image_ids()]
    images = encode_images(model, paths, batch_size)
    captions = encode_captions(model, karpathy.captions, batch_size)
    sims = model.exact_scores(images, captions)
    return evaluate_sims(sims)


# ------------------------------------------------------------------------------------ refer (boxes, masks)


EXPRESSION_CUES: tuple[str, ...] = ("location", "colour", "size", "other")
# the generator's words of each cue but "other", in the order expression_cue tries them
CUE_WORDS: tuple[tuple[str, frozenset[str]], ...] = (
    ("location", frozenset(word for phrases in LOCATION_PHRASES.values() for phrase in phrases
                           for word in phrase.split()) - {"on", "to", "at", "the", "in"}),
    ("colour", frozenset(SHAPE_COLOURS)),
    ("size", frozenset(word for options in SIZE_WORDS.values() for word in options)),
)


def expression_cue(text: str) -> str:
    """The cue a referring expression of the synthetic generator relies on, first match wins: ``location`` (a
    location word), ``colour`` (a colour word, no location), ``size`` (a size word, neither of those), else
    ``other`` (on the synthetic data: the shape noun alone). On real RefCOCO text the same word lists apply."""
    words = expression_words(text)
    return next((cue for cue, cue_words in CUE_WORDS if words & cue_words), "other")


def metrics_by_cue(texts: list[str], values: dict[str, list[float]]) -> dict[str, float]:
    """``<metric> <cue>`` (the mean of each per-sentence list of ``values`` over the sentences of that cue, in
    percent) and ``sentences <cue>``, for every cue that occurs."""
    cues = [expression_cue(text) for text in texts]
    out: dict[str, float] = {}
    for cue in EXPRESSION_CUES:
        chosen = [i for i, c in enumerate(cues) if c == cue]
        if not chosen:
            continue
        for name, per_sentence in values.items():
            out[f"{name} {cue}"] = 100.0 * float(np.mean([per_sentence[i] for i in chosen]))
        out[f"sentences {cue}"] = float(len(chosen))
    return out


def box_iou_xyxy(a: np.ndarray, b: np.ndarray) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _refer_sentences(refer: Any, split: str) -> dict[int, list[tuple[dict, str]]]:
    """Every (ref, sentence) of a split, grouped by image id (one model call per image)."""
    by_image: dict[int, list[tuple[dict, str]]] = {}
    for ref_id in refer.ref_ids(split):
        ref = refer.refs_by_id[ref_id]
        for sentence in ref["sentences"]:
            by_image.setdefault(ref["image_id"], []).append((ref, sentence["raw"]))
    return by_image


def _objects_of_image(refer: Any) -> dict[int, list[dict]]:
    objects: dict[int, list[dict]] = {}
    for ann in refer.annotations.values():
        objects.setdefault(ann["image_id"], []).append(ann)
    return objects


BOX_OUTCOMES: tuple[str, ...] = ("hit", "imprecise", "other object", "elsewhere")


def box_outcome(box: np.ndarray, referent_id: int, objects: list[dict]) -> str:
    """What a predicted box did, one of :data:`BOX_OUTCOMES`: ``hit`` (IoU >= 0.5 with the referent); else by
    the annotated object of the image the box overlaps most: ``imprecise`` (the referent: found, badly boxed),
    ``other object`` (another object, at IoU >= 0.5: the wrong one picked), ``elsewhere`` (another object, less,
    or none at all)."""
    ious = {a["id"]: box_iou_xyxy(box, _ann_box_xyxy(a, np.float32)) for a in objects}  # as ``ref_box_xyxy``
    if ious[referent_id] >= 0.5:
        return "hit"
    best = max(ious, key=lambda ann_id: (ious[ann_id], ann_id == referent_id))
    if ious[best] > 0 and best == referent_id:
        return "imprecise"
    return "other object" if ious[best] >= 0.5 else "elsewhere"


def _ann_box_xyxy(ann: dict, dtype: Any = np.float64) -> np.ndarray:
    x, y, w, h = ann["bbox"]
    return np.array([x, y, x + w, y + h], dtype=dtype)


def evaluate_boxes(grounder: Any, data_root: Path, dataset: str = "refsynth", split_by: str = "unc",
                   split: str = "test", by_cue: bool = False, per_scale: bool = False,
                   by_outcome: bool = False) -> dict[str, float]:
    """REC Acc@0.5 over every sentence of the split; ``chance``: the expected Acc@0.5 of picking one of the
    image's annotated objects at random. ``by_cue`` adds Acc@0.5 and chance per :func:`expression_cue`;
    ``per_scale`` adds ``Acc@0.5 scale<l>``, the Acc@0.5 of the box each scale's [REG] gives (ScanFormer's
    ``per_scale_boxes``, coarse to fine; the last scale's is the answer): how much each finer scale refines.
    ``by_outcome`` adds ``outcome <name>``, the percentage of sentences per :func:`box_outcome` (per cue too
    with ``by_cue``): whether a miss found the referent but boxed it badly, or picked another object."""
    from training.datasets import read_refer

    refer = read_refer(data_root, dataset, split_by)
    objects = _objects_of_image(refer)
    correct, chance, ious, texts = [], [], [], []
    scale_correct: list[list[bool]] = []
    outcomes: list[str] = []
    for image_id, items in tqdm(_refer_sentences(refer, split).items(), desc="images", unit="image"):
        image = read_image(refer.image_path(items[0][0]))
        results = grounder.ground(image, [text for _, text in items])
        texts += [text for _, text in items]
        for (ref, _), result in zip(items, results, strict=True):
            target = refer.ref_box_xyxy(ref)
            box = np.asarray(result["box_xyxy"], np.float64)
            iou = box_iou_xyxy(box, target)
            ious.append(iou)
            correct.append(iou >= 0.5)
            if per_scale:
                scale_correct.append([box_iou_xyxy(np.asarray(scale_box, np.float64), target) >= 0.5
                                      for scale_box in result["per_scale_boxes"]])
            if by_outcome:
                outcomes.append(box_outcome(box, ref["ann_id"], objects[image_id]))
            candidates = [_ann_box_xyxy(a) for a in objects[image_id]]
            chance.append(np.mean([box_iou_xyxy(c, target) >= 0.5 for c in candidates]))
    result = {"Acc@0.5": 100.0 * float(np.mean(correct)), "mean_IoU": 100.0 * float(np.mean(ious)),
              "chance_Acc@0.5": 100.0 * float(np.mean(chance)), "sentences": float(len(correct))}
    if by_outcome:
        shares = {f"outcome {name}": [outcome == name for outcome in outcomes] for name in BOX_OUTCOMES}
        result.update({key: 100.0 * float(np.mean(values)) for key, values in shares.items()})
    if by_cue:
        per_sentence = {"Acc@0.5": correct, "chance_Acc@0.5": chance, **(shares if by_outcome else {})}
        result.update(metrics_by_cue(texts, per_sentence))
    if per_scale:
        for scale, hits in enumerate(zip(*scale_correct, strict=True)):
            result[f"Acc@0.5 scale{scale}"] = 100.0 * float(np.mean(hits))
    return result


def evaluate_masks(segmenter: Any, data_root: Path, dataset: str = "refsynth", split_by: str = "unc",
                   split: str = "test", by_cue: bool = False) -> dict[str, float]:
    """Official ``test.py`` metrics at the model's S x S: prediction ``sigmoid > 0.5`` of the S x S logits vs the
    LAVT target (part count == 1) NEAREST-resized to S x S. ``chance_mIoU``: the expected IoU of one of the
    image's annotated objects picked at random (same target rule). ``by_cue`` adds mIoU and chance per
    :func:`expression_cue`."""
    import torch

    from models.magnet import mask_probabilities, preprocess_image, reference_target, tokenize_expressions
    from training.datasets import decode_segmentation, read_refer
    from training.refer_metrics import ReferSegmentationMetrics

    refer = read_refer(data_root, dataset, split_by)
    objects = _objects_of_image(refer)
    metrics, chance, ious, texts = ReferSegmentationMetrics(), [], [], []
    size = segmenter.img_size
    model = segmenter.model
    for image_id, items in tqdm(_refer_sentences(refer, split).items(), desc="images", unit="image"):
        image = read_image(refer.image_path(items[0][0]))
        pixels = preprocess_image(image, size).unsqueeze(0).to(segmenter.device)
        ids, mask = tokenize_expressions([text for _, text in items], max_tokens=model.config.max_tokens)
        with torch.inference_mode(), segmenter.autocast_context():
            out = model(pixels, ids.to(segmenter.device), mask.to(segmenter.device))
        probs = mask_probabilities(out["pred_logits"], out["pred_masks"], (size, size))[:, 0].float().cpu().numpy()
        info = refer.images[image_id]
        candidates = [reference_target(decode_segmentation(a["segmentation"], info["height"], info["width"]), size)
                      for a in objects[image_id]]
        for (ref, text), prob in zip(items, probs, strict=True):
            target = reference_target(refer.ref_mask_sum(ref), size)
            ious.append(metrics.update(prob > 0.5, target))
            texts.append(text)
            chance.append(np.mean([_mask_iou(c, target) for c in candidates]))
    result = {k: 100.0 * v for k, v in metrics.summary().items()}
    result["chance_mIoU"] = 100.0 * float(np.mean(chance))
    result["sentences"] = float(metrics.num_sentences)
    if by_cue:
        result.update(metrics_by_cue(texts, {"mIoU": ious, "chance_mIoU": chance}))
    return result


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


# ------------------------------------------------------------------------------------------ demo weights


def evaluate_demo_entry(method: str, checkpoint: Path, data_root: Path, device: str = "cpu",
                        by_cue: bool = False) -> dict[str, float]:
    """Held-out (``test``) metrics of one demo model on its synthetic benchmark, with the chance level;
    ``by_cue``: ScanFormer / MagNet also per :func:`expression_cue`."""
    from service.registry import adapter_class

    adapter, _ = adapter_class(method)
    model = adapter.from_checkpoint(str(checkpoint), device=device, precision="fp32")
    if method in ("irra", "ivt"):
        args = argparse.Namespace(root=data_root / "person", dataset="CUHK-PEDES", split="test", method=method,
                                  batch_size=64, ivt_official=False)
        metrics = evaluate_person(args, model)
        split = read_person_annotations(data_root / "person", "CUHK-PEDES").test
        metrics["chance_R1"] = chance_person_r1(split.caption_pids, split.image_pids)
        return metrics
    if method == "laps":
        metrics = evaluate_caption(model, data_root / "caption")
        num_images = len(read_karpathy_ids(data_root / "caption"))
        metrics["chance_t2i_r1"] = 100.0 / num_images
        metrics["chance_i2t_r1"] = 100.0 * 5 / (5 * num_images)
        return metrics
    if method == "scanformer":
        return evaluate_boxes(model, data_root / "refer", by_cue=by_cue)
    return evaluate_masks(model, data_root / "refer", by_cue=by_cue)


def read_karpathy_ids(caption_root: Path, dataset: str = "synth", split: str = "test") -> list[int]:
    from training.datasets import read_karpathy_split

    return read_karpathy_split(caption_root / dataset, split).unique_image_ids()


HEADLINE: dict[str, tuple[str, str]] = {  # method -> (metric, its chance level) in the demo table
    "irra": ("R1", "chance_R1"), "ivt": ("R1", "chance_R1"), "laps": ("t2i_r1", "chance_t2i_r1"),
    "scanformer": ("Acc@0.5", "chance_Acc@0.5"), "mask": ("mIoU", "chance_mIoU"), "magnet": ("mIoU", "chance_mIoU"),
}


def evaluate_demo(weights: Path, data_root: Path | None, device: str = "cpu",
                  by_cue: bool = False) -> dict[str, dict[str, float]]:
    """Every model of ``<weights>/manifest.json``; the synthetic data is (re)generated from the manifest's seed
    and size when ``data_root`` lacks it, and its version must equal the manifest's."""
    from training.demo import ensure_data

    manifest = json.loads((weights / "manifest.json").read_text())
    data_root = ensure_data(data_root, int(manifest["seed"]), manifest["data_size"], manifest["data_versions"])
    results = {}
    for method, entry in manifest["models"].items():
        results[method] = evaluate_demo_entry(method, weights / entry["file"], data_root, device, by_cue)
    return results


def print_demo_table(results: dict[str, dict[str, float]]) -> None:
    print("| method | held-out metric | value | chance |")
    print("|---|---|---|---|")
    for method, metrics in results.items():
        name, chance = HEADLINE[method]
        print(f"| {method} | {name} | {metrics[name]:.2f} | {metrics[chance]:.2f} |")


def print_cue_table(results: dict[str, dict[str, float]], write: Callable[[str], Any] = print) -> None:
    """The headline metric per expression cue (:func:`expression_cue`), for the results that have it."""
    write("| method | metric | " + " | ".join(EXPRESSION_CUES) + " |")
    write("|---|---|" + "---|" * len(EXPRESSION_CUES))
    for method, metrics in results.items():
        name, chance = HEADLINE[method]
        if f"sentences {EXPRESSION_CUES[0]}" not in metrics:
            continue
        cells = [f"{metrics[f'{name} {cue}']:.2f} (chance {metrics[f'{chance} {cue}']:.2f}, "
                 f"{metrics[f'sentences {cue}']:.0f} sentences)" if f"sentences {cue}" in metrics else "-"
                 for cue in EXPRESSION_CUES]
        write(f"| {method} | {name} | " + " | ".join(cells) + " |")


def print_table(title: str, metrics: dict[str, float]) -> None:
    names = list(metrics)
    print(title)
    print("| " + " | ".join(names) + " |")
    print("|" + "---|" * len(names))
    print("| " + " | ".join(f"{metrics[n]:.2f}" for n in names) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="task", required=True)
    person = sub.add_parser("person", help="text-to-person retrieval (IRRA, IVT)")
    person.add_argument("--method", choices=["irra", "ivt"], required=True)
    person.add_argument("--dataset", choices=sorted(PERSON_DATASETS), required=True)
    person.add_argument("--root", type=Path, required=True, help="folder holding <dataset>/<annotation file> + imgs")
    person.add_argument("--split", choices=["test", "val"], default="test")
    person.add_argument("--checkpoint", type=Path, help="official best.pth / checkpoint_best.pth (none: random)")
    person.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "official"])
    person.add_argument("--device", default="cpu")
    person.add_argument("--batch-size", type=int, default=64)
    person.add_argument("--ivt-official", action="store_true", help="IVT's own evaluator instead of the standard")
    person.add_argument("--json", action="store_true", help="print the metrics as JSON")
    caption = sub.add_parser("caption", help="text-image retrieval (LAPS) on a Karpathy split")
    caption.add_argument("--checkpoint", type=Path, required=True)
    caption.add_argument("--root", type=Path, required=True, help="folder holding <dataset>/ and images/")
    caption.add_argument("--dataset", default="synth")
    caption.add_argument("--split", default="test")
    for name, help_text in (("box", "referring expression comprehension (ScanFormer)"),
                            ("mask", "referring image segmentation (MagNet)")):
        refer = sub.add_parser(name, help=help_text)
        refer.add_argument("--checkpoint", type=Path, required=True)
        refer.add_argument("--root", type=Path, required=True, help="refer API data root")
        refer.add_argument("--dataset", default="refcoco")
        refer.add_argument("--split-by", default="unc")
        refer.add_argument("--split", default="val")
        refer.add_argument("--by-cue", action="store_true",
                           help="also per expression cue: location, colour, size, other (see expression_cue)")
    demo = sub.add_parser("demo", help="the demo weights on their held-out synthetic splits, next to chance")
    demo.add_argument("--weights", type=Path, default=Path("weights/demo"))
    demo.add_argument("--data", type=Path, help="synthetic data root (generated there when missing)")
    demo.add_argument("--by-cue", action="store_true",
                      help="also ScanFormer / MagNet per expression cue: location, colour, size, other")
    sub.choices["box"].add_argument("--per-scale", action="store_true",
                                    help="also the Acc@0.5 of each scale's box, coarse to fine")
    sub.choices["box"].add_argument("--by-outcome", action="store_true",
                                    help="also the share of boxes that hit, found the referent but boxed it "
                                         "badly, picked another object, or neither")
    for p in (caption, sub.choices["box"], sub.choices["mask"], demo):
        p.add_argument("--device", default="cpu")
        p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    args = parser.parse_args(argv)
    if args.task == "person":
        metrics = evaluate_person(args)
        title = f"{args.method} on {args.dataset} {args.split}"
    elif args.task == "caption":
        from models.laps import LapsSearchModel

        model = LapsSearchModel.from_checkpoint(args.checkpoint, device=args.device)
        metrics = evaluate_caption(model, args.root, args.dataset, args.split)
        title = f"laps on {args.dataset} {args.split}"
    elif args.task == "box":
        from models.scanformer import ScanFormerGrounder

        model = ScanFormerGrounder.from_checkpoint(args.checkpoint, device=args.device)
        metrics = evaluate_boxes(model, args.root, args.dataset, args.split_by, args.split, args.by_cue,
                                 args.per_scale, args.by_outcome)
        title = f"scanformer on {args.dataset} ({args.split_by}) {args.split}"
    elif args.task == "mask":
        from models.magnet import MagNetSegmenter

        model = MagNetSegmenter.from_checkpoint(args.checkpoint, device=args.device)
        metrics = evaluate_masks(model, args.root, args.dataset, args.split_by, args.split, args.by_cue)
        title = f"magnet on {args.dataset} ({args.split_by}) {args.split}"
    else:
        results = evaluate_demo(args.weights, args.data, args.device, args.by_cue)
        if args.json:
            print(json.dumps(results, indent=1))
        else:
            print_demo_table(results)
            if args.by_cue:
                print()
                print_cue_table(results)
        return 0
    if args.json:
        print(json.dumps(metrics))
    else:
        print_table(title, metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
