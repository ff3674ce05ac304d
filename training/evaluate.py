"""One evaluation CLI with each method's official metric definitions: ``python -m training.evaluate --help``.

    person  IRRA / IVT on CUHK-PEDES, ICFG-PEDES or RSTPReid test (or val): R1/R5/R10/mAP/mINP.
            IRRA: the official ``rank`` over all test captions x all test images.
            IVT: the standard unique-gallery protocol by default; ``--ivt-official`` gives the official
            IVT evaluator (CUHK/RSTP ``[::2]`` gallery, trapezoidal AP) to compare with IVT's own logs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from training.datasets import PERSON_DATASETS, read_image, read_person_annotations


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
    args = parser.parse_args(argv)
    if args.task == "person":
        metrics = evaluate_person(args)
        if args.json:
            print(json.dumps(metrics))
        else:
            print_table(f"{args.method} on {args.dataset} {args.split}", metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
