"""Parity runners for MagNet: kinds ``segment``, ``preprocess``, ``metrics`` and ``fill_check``.

Everything a case varies (config, seeds, shapes, images, texts) is read from the case, so new cases of these
kinds run unchanged.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from models.magnet import (
    MagNet,
    MagNetConfig,
    mask_probabilities,
    preprocess_image,
    reference_target,
    tokenize_expressions,
)
from models.parity import ParityCase, fill_module
from training.refer_metrics import ReferSegmentationMetrics

_CONFIG_KEYS = {  # case config name -> MagNetConfig field
    "img_size": "img_size",
    "embed_dim": "embed_dim",
    "depths": "depths",
    "num_heads": "num_heads",
    "window_size": "window_size",
    "mlp_ratio": "mlp_ratio",
    "fusion_heads": "fusion_heads",
    "lang_pwam_after_layers": "lang_stage_ends",
    "max_tokens": "max_tokens",
    "num_queries": "num_queries",
    "num_classes": "num_classes",
}

_MODEL_CACHE: dict[str, MagNet] = {}


def config_from_case(case: ParityCase) -> MagNetConfig:
    values = {field: case.config[name] for name, field in _CONFIG_KEYS.items() if name in case.config}
    return MagNetConfig.from_dict(values)


def filled_model(case: ParityCase) -> MagNet:
    """MagNet built from the case config and filled by the case's fill rule (cached: building is slow)."""
    config = config_from_case(case)
    cache_key = json.dumps(config.to_dict(), sort_keys=True)
    if cache_key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        model = MagNet(config).eval()
        fill_module(model, case.keys)
        _MODEL_CACHE[cache_key] = model
    return _MODEL_CACHE[cache_key]


def _mean_std(t: torch.Tensor) -> list[float]:
    """[mean, population std] in float64 over all elements of a float32 tensor."""
    values = t.detach().double()
    return [float(values.mean()), float(values.std(unbiased=False))]


def run_segment(case: ParityCase) -> dict[str, Any]:
    model = filled_model(case)
    pixels = torch.from_numpy(case.inputs["pixel_values"])
    ids = torch.as_tensor(case.inputs["input_ids"], dtype=torch.long)
    mask = torch.as_tensor(case.inputs["attention_mask"], dtype=torch.long)
    with torch.inference_mode():
        out = model(pixels, ids, mask, return_features=True)
        semseg = mask_probabilities(out["pred_logits"], out["pred_masks"], tuple(pixels.shape[-2:]))
    produced: dict[str, Any] = {
        "pred_logits": out["pred_logits"].numpy(),
        "pred_masks": out["pred_masks"].numpy(),
        "semseg": semseg.numpy(),
        "lang": out["language"].numpy(),
        "lang_mean_std": _mean_std(out["language"]),
    }
    for i, feature in enumerate(out["features"], start=1):
        produced[f"s{i}_mean_std"] = _mean_std(feature)
    # foreground count of the official decision; the core compares it within the case's atol (notes: pixels
    # whose upsampled logit sits within the logit tolerance of 0 may flip)
    produced["mask_pixels"] = int((semseg > 0.5).sum())
    return produced


def _suffixes(case: ParityCase) -> list[str]:
    return sorted(name[len("image_"):] for name in case.inputs if name.startswith("image_"))


def run_preprocess(case: ParityCase) -> dict[str, Any]:
    produced: dict[str, Any] = {}
    for suffix in _suffixes(case):
        size = int(np.asarray(case.inputs[f"img_size_{suffix}"]).reshape(-1)[0])
        pixels = preprocess_image(case.inputs[f"image_{suffix}"], size)
        produced[f"pixel_values_{suffix}"] = pixels.numpy()
        per_channel = pixels.double().flatten(1)
        produced[f"pixel_values_{suffix}_channel_mean"] = per_channel.mean(1).tolist()
        produced[f"pixel_values_{suffix}_channel_std"] = per_channel.std(1, unbiased=False).tolist()
        refmask_key = f"refmask_{suffix}"
        if refmask_key in case.inputs:
            counts = np.asarray(case.inputs[refmask_key])[..., 0]  # RGB-decoded PNG: channel 0 holds the count
            target = reference_target(counts, size)
            produced[f"target_{suffix}_pixels"] = int(target.sum())
            produced[f"target_{suffix}_row_sums"] = target.sum(axis=1).tolist()
            produced[f"target_{suffix}_col_sums"] = target.sum(axis=0).tolist()
    if "text" in case.inputs:
        from models.tokenizers import bert_tokenizer

        tokenizer = bert_tokenizer()
        max_tokens = int(case.config.get("max_tokens", 20))
        ids, mask = tokenize_expressions(case.inputs["text"], tokenizer, max_tokens)
        produced["input_ids"] = ids.numpy()
        produced["attention_mask"] = mask.numpy()
        produced["wordpieces"] = [
            ["[PAD]" if m == 0 else tok for tok, m in zip(tokenizer.convert_ids_to_tokens(row.tolist()), mrow,
                                                          strict=True)]
            for row, mrow in zip(ids, mask.tolist(), strict=True)
        ]
    return produced


def run_metrics(case: ParityCase) -> dict[str, Any]:
    preds = np.asarray(case.inputs["pred_masks"])
    gts = np.asarray(case.inputs["gt_masks"])
    thresholds = tuple(case.config.get("iou_thresholds", (0.5, 0.6, 0.7, 0.8, 0.9)))
    metrics = ReferSegmentationMetrics(thresholds=thresholds)
    for pred, gt in zip(preds, gts, strict=True):
        metrics.update(pred.astype(bool), gt.astype(bool))
    return {
        "per_sentence_iou": metrics.ious,
        "cum_I": metrics.cum_intersection,
        "cum_U": metrics.cum_union,
        "mIoU": metrics.mean_iou,
        "oIoU": metrics.overall_iou,
        "precision": metrics.precision,
        "printed": metrics.report_lines(),
    }


def run_fill_check(case: ParityCase) -> dict[str, Any]:
    config = MagNetConfig(window_size=int(case.config.get("window_size", 12)))
    model = MagNet(config)
    fill_module(model, case.keys)
    state = model.state_dict()
    expected_counts = (case.config.get("num_entries"), case.config.get("num_float_entries"),
                       case.config.get("num_int_entries"))
    counts = (len(state), sum(t.is_floating_point() for t in state.values()),
              sum(not t.is_floating_point() for t in state.values()))
    if expected_counts[0] is not None and counts != expected_counts:
        raise AssertionError(f"state_dict entry counts {counts} != official {expected_counts}")
    first6, sums, squares = [], [], []
    for name in case.config["probed_keys"]:
        tensor = state[name]
        if tensor.is_floating_point():
            flat = tensor.detach().double().reshape(-1)
            first6.append([float(v) for v in flat[:6]])
            sums.append(float(flat.sum()))
            squares.append(float((flat * flat).sum()))
        else:
            flat = tensor.reshape(-1)
            first6.append([int(v) for v in flat[:6]])
            sums.append(int(flat.sum()))
            squares.append(int((flat * flat).sum()))
    return {"first6": first6, "sum": sums, "sum_of_squares": squares}


RUNNERS = {
    "segment": run_segment,
    "preprocess": run_preprocess,
    "metrics": run_metrics,
    "fill_check": run_fill_check,
}
