"""MagNet CPU latency (fp32 vs bf16 autocast) and how much the bf16 masks differ from the fp32 ones.

Usage: ``python -m benchmarks.magnet_latency [--checkpoint weights/magnet_refcoco.pth] [--runs 5] [--out r.json]``

- Latency: one 480-px request (a 480x480 RGB image, one expression) through ``MagNetSegmenter.segment`` end to
  end (resize, tokenize, forward, upsample to the original size); the median of ``--runs`` after ``--warmup``.
- Agreement: on the parity inputs (the two ``segment`` cases' normalised images and token ids, and the
  ``preprocess`` case's images with its expressions), masks ``p > 0.5`` from fp32 and bf16 are compared by IoU
  (at 480 x 480 for the segment cases, at the original image size for the images). The fp32 masks of the
  segment cases are also checked against the recorded official ones.

Without ``--checkpoint`` the full-size model is filled by the parity fill rule (crc32-normal-v1), so the
latency is real but the masks come from random weights; random weights are less smooth than trained ones, so
treat the bf16 IoU then as a pessimistic bound. The language-side fusion always runs in float32 (see
``models/magnet.py``: its -1e4-scaled queries do not survive bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from models.magnet import MagNetConfig, MagNetSegmenter, mask_probabilities
from models.parity import fill_module, find_cases, load_case
from training.demo import machine_description

DEFAULT_FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "parity" / "magnet"


def build_segmenter(checkpoint: str | None, precision: str) -> MagNetSegmenter:
    if checkpoint:
        return MagNetSegmenter.from_checkpoint(checkpoint, device="cpu", precision=precision)
    segmenter = MagNetSegmenter.from_config(MagNetConfig(), device="cpu", precision=precision,
                                            version="magnet-crc32-fill")
    fill_module(segmenter.model)
    return segmenter


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def request_image(fixtures: Path) -> Image.Image:
    """A 480x480 photo-like request: the preprocess case's second image, resized."""
    images = sorted(fixtures.glob("preprocess/img_*.png"))
    if images:
        with Image.open(images[-1]) as img:
            return img.convert("RGB").resize((480, 480), Image.BILINEAR)
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (480, 480, 3), dtype=np.uint8))


def time_requests(segmenter: MagNetSegmenter, image: Image.Image, text: str, warmup: int, runs: int
                  ) -> list[float]:
    for _ in range(warmup):
        segmenter.segment(image, [text])
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        segmenter.segment(image, [text])
        times.append(time.perf_counter() - start)
    return times


def parity_masks(segmenter: MagNetSegmenter, fixtures: Path) -> dict[str, np.ndarray]:
    """Masks (p > 0.5) for every parity input, keyed by a readable name."""
    masks: dict[str, np.ndarray] = {}
    for case_json in find_cases([fixtures]):
        case = load_case(case_json)
        if case.kind == "segment":
            pixels = torch.from_numpy(case.inputs["pixel_values"])
            ids = torch.as_tensor(case.inputs["input_ids"], dtype=torch.long)
            mask = torch.as_tensor(case.inputs["attention_mask"], dtype=torch.long)
            with torch.inference_mode(), segmenter.autocast_context():
                out = segmenter.model(pixels, ids, mask)
            probs = mask_probabilities(out["pred_logits"], out["pred_masks"], tuple(pixels.shape[-2:]))
            masks[case.name] = probs[0, 0].numpy() > 0.5
        elif case.kind == "preprocess" and "text" in case.inputs:
            texts = list(case.inputs["text"])[:2]
            for name in sorted(k for k in case.inputs if k.startswith("image_")):
                maps = segmenter.segment(case.inputs[name], texts)
                for i, prob in enumerate(maps):
                    masks[f"{case.name}/{name}/text{i}"] = prob > 0.5
    return masks


def recorded_agreement(masks: dict[str, np.ndarray], fixtures: Path) -> dict[str, float]:
    out = {}
    for name, mask in masks.items():
        recorded = fixtures / name / "semseg.npy"
        if recorded.exists():
            out[name] = iou(mask, np.load(recorded)[0, 0] > 0.5)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=None, help="an official magnet_*.pth (default: crc32 fill)")
    parser.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--text", default="the man on the left wearing a red shirt")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    result: dict[str, Any] = {
        "weights": args.checkpoint and Path(args.checkpoint).name or "crc32-normal-v1 fill (random)",
        **machine_description(), "loadavg_start": os.getloadavg()[0], "runs": args.runs, "latency_s": {},
    }
    image = request_image(args.fixtures)
    masks: dict[str, dict[str, np.ndarray]] = {}
    for precision in ("fp32", "bf16"):
        segmenter = build_segmenter(args.checkpoint, precision)
        times = time_requests(segmenter, image, args.text, args.warmup, args.runs)
        result["latency_s"][precision] = {"median": statistics.median(times), "all": times}
        print(f"{precision}: median {statistics.median(times):.2f} s over {len(times)} requests", flush=True)
        masks[precision] = parity_masks(segmenter, args.fixtures)
        del segmenter
    result["speedup_bf16"] = result["latency_s"]["fp32"]["median"] / result["latency_s"]["bf16"]["median"]
    result["iou_fp32_vs_bf16"] = {name: iou(masks["fp32"][name], masks["bf16"][name]) for name in masks["fp32"]}
    result["mean_iou_fp32_vs_bf16"] = float(np.mean(list(result["iou_fp32_vs_bf16"].values())))
    if not args.checkpoint:
        result["iou_fp32_vs_recorded_official"] = recorded_agreement(masks["fp32"], args.fixtures)
    result["loadavg_end"] = os.getloadavg()[0]
    for name, value in result["iou_fp32_vs_bf16"].items():
        print(f"IoU fp32 vs bf16 {name}: {value:.4f}")
    print(json.dumps({k: v for k, v in result.items() if k != "latency_s"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
