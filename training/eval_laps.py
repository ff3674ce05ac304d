"""Evaluate a LAPS checkpoint on a Karpathy split, as the official ``eval.py`` / ``evalrank`` does.

Reads ``{split}_caps.txt`` (one caption a line), ``{split}_ids.txt`` (one image id a line, listed once per caption
or once per image) and ``id_mapping.json`` (image id -> file name, resolved under ``--image-root``). Caption j
belongs to image j // 5. Protocols:

- ``f30k-1k``: Flickr30K test, 1000 images x 5000 captions;
- ``coco-5fold``: COCO 1K, five folds of 1000 images x 5000 captions, metrics averaged over the folds;
- ``coco-5k``: COCO 5K, all 5000 images x 25000 captions;
- ``single``: whatever the split holds, as one matrix.

Example::

    python -m training.eval_laps --checkpoint weights/official/laps_coco_vit/model_best.pth \\
        --data-dir data/coco --image-root data/coco/images --split testall --protocol coco-5fold coco-5k
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile
from tqdm import tqdm

from models.laps import LapsSearchModel
from models.laps_scoring import LapsCaptionState, LapsImageState
from training.laps_metrics import average_folds, evaluate_sims

ImageFile.LOAD_TRUNCATED_IMAGES = True  # as lib/image_caption.py
CAPTIONS_PER_IMAGE = 5


def read_split(data_dir: Path, split: str) -> tuple[list[str], list[int]]:
    """Captions (stripped lines) and the image id of each caption's image, one entry per unique image."""
    captions = [line.strip() for line in (data_dir / f"{split}_caps.txt").read_text().splitlines()]
    while captions and not captions[-1]:
        captions.pop()
    ids = [int(x) for x in (data_dir / f"{split}_ids.txt").read_text().split()]
    if len(ids) == len(captions):  # listed once per caption (test splits): keep every 5th
        image_ids = ids[::CAPTIONS_PER_IMAGE]
    elif len(ids) * CAPTIONS_PER_IMAGE == len(captions):
        image_ids = ids
    else:
        raise ValueError(f"{split}: {len(captions)} captions do not fit {len(ids)} ids at 5 captions per image")
    if len(captions) != CAPTIONS_PER_IMAGE * len(image_ids):
        raise ValueError(f"{split}: expected 5 captions per image")
    return captions, image_ids


def encode_images(model: LapsSearchModel, paths: list[Path], batch_size: int) -> LapsImageState:
    parts = []
    for start in tqdm(range(0, len(paths), batch_size), desc="images", unit="batch"):
        batch = []
        for path in paths[start:start + batch_size]:
            with Image.open(path) as img:
                batch.append(img.convert("RGB"))
        parts.append(model.image_states(batch))
    return LapsImageState.cat(parts)


def encode_captions(model: LapsSearchModel, captions: list[str], batch_size: int) -> LapsCaptionState:
    parts = []
    for start in tqdm(range(0, len(captions), batch_size), desc="captions", unit="batch"):
        parts.append(model.caption_states(captions[start:start + batch_size]))
    return LapsCaptionState.cat(parts)


def score_with_progress(model: LapsSearchModel, images: LapsImageState, captions: LapsCaptionState,
                        desc: str) -> np.ndarray:
    # nothing else runs torch here: one single-threaded worker per torch thread beats intra-op threads on a busy host
    with tqdm(total=len(images) * len(captions), desc=desc, unit="pair", unit_scale=True) as bar:
        return model.exact_scores(images, captions, progress=bar.update, workers=torch.get_num_threads())


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.backends.cuda.matmul.allow_tf32 = False  # the official pipeline is plain fp32
    torch.backends.cudnn.allow_tf32 = False
    data_dir = Path(args.data_dir)
    captions, image_ids = read_split(data_dir, args.split)
    mapping = json.loads((data_dir / "id_mapping.json").read_text())
    paths = [Path(args.image_root) / mapping[str(i)] for i in image_ids]
    if args.limit_images:
        paths, captions = paths[: args.limit_images], captions[: CAPTIONS_PER_IMAGE * args.limit_images]
    model = LapsSearchModel.from_checkpoint(args.checkpoint, device=args.device, precision=args.precision,
                                            batch_size=args.batch_size)
    print(f"model {model.version}: {model.config.backbone}, embed {model.embed_dim}, K={model.config.keep_k}, "
          f"Nc={model.config.num_aggregated}; {len(paths)} images, {len(captions)} captions", file=sys.stderr)
    images = encode_images(model, paths, args.batch_size)
    texts = encode_captions(model, captions, args.batch_size)
    results: dict[str, Any] = {"model": model.version, "split": args.split}
    full = None
    if "coco-5k" in args.protocol or "single" in args.protocol or "f30k-1k" in args.protocol:
        full = score_with_progress(model, images, texts, "LAPS scores")
        if args.save_sims:
            np.save(args.save_sims, full)
        for name in ("coco-5k", "single", "f30k-1k"):
            if name in args.protocol:
                results[name] = evaluate_sims(full)
    if "coco-5fold" in args.protocol:
        fold_images = args.fold_images
        if len(images) != 5 * fold_images:
            raise ValueError(f"coco-5fold needs 5 x {fold_images} images, the split has {len(images)}")
        folds = []
        for k in range(5):
            img_slice = slice(k * fold_images, (k + 1) * fold_images)
            cap_slice = slice(CAPTIONS_PER_IMAGE * k * fold_images, CAPTIONS_PER_IMAGE * (k + 1) * fold_images)
            if full is not None:
                sims = full[img_slice, cap_slice]
            else:
                sims = score_with_progress(model, images.select(img_slice), texts.select(cap_slice), f"fold {k}")
            folds.append(evaluate_sims(sims))
        results["coco-5fold"] = average_folds(folds)
        results["coco-5fold-per-fold"] = folds
    for name in args.protocol:
        m = results[name]
        print(f"{name}: rsum {m['rsum']:.1f} | i2t R@1/5/10 {m['i2t_r1']:.1f} {m['i2t_r5']:.1f} {m['i2t_r10']:.1f}"
              f" medr {m['i2t_medr']:.1f} | t2i R@1/5/10 {m['t2i_r1']:.1f} {m['t2i_r5']:.1f} {m['t2i_r10']:.1f}"
              f" medr {m['t2i_medr']:.1f}")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.eval_laps", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="official model_best.pth (or one written here)")
    parser.add_argument("--data-dir", required=True,
                        help="folder with {split}_caps.txt, {split}_ids.txt and id_mapping.json")
    parser.add_argument("--image-root", required=True, help="folder the id_mapping file names are relative to")
    parser.add_argument("--split", default="test", help="test (Flickr30K), testall (COCO), dev, ...")
    parser.add_argument("--protocol", nargs="+", default=["f30k-1k"],
                        choices=["f30k-1k", "coco-5fold", "coco-5k", "single"])
    parser.add_argument("--fold-images", type=int, default=1000, help="images per COCO 1K fold")
    parser.add_argument("--limit-images", type=int, default=0, help="only the first N images (smoke tests)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="official", choices=["official", "fp32", "bf16", "fp16"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--save-sims", default="", help="write the [images, captions] score matrix (.npy)")
    parser.add_argument("--output", default="", help="write the metrics as JSON")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
