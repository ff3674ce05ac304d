"""Parity runners for IVT: every case is read from its case.json (config, seeds, shapes, keys)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.ivt import IVT, IVTConfig, cmpm_loss, preprocess_image, tokenize_captions
from models.parity import ParityCase, fill_module
from training.ivt_metrics import official_ivt_metrics


def _config_from_case(config: dict[str, Any]) -> IVTConfig:
    default = IVTConfig()
    return IVTConfig(
        image_size=tuple(config.get("image_size", default.image_size)),  # type: ignore[arg-type]
        patch_size=int(config.get("patch_size", default.patch_size)),
        stride=int(config.get("stride", default.stride)),
        embed_dim=int(config.get("embed_dim", default.embed_dim)),
        depth=int(config.get("depth", default.depth)),
        num_heads=int(config.get("num_heads", default.num_heads)),
        mlp_hidden_dim=int(config.get("mlp_hidden", default.mlp_hidden_dim)),
        vocab_size=int(config.get("vocab_size", default.vocab_size)),
        max_position_embeddings=int(config.get("max_position_embeddings", default.max_position_embeddings)),
        num_classes=int(config.get("num_classes", default.num_classes)),
        layer_norm_eps=float(config.get("layernorm_eps", default.layer_norm_eps)),
        text_layer_norm_eps=float(config.get("text_embedding_layernorm_eps", default.text_layer_norm_eps)),
    )


def run_encode(case: ParityCase) -> dict[str, Any]:
    """``out_vis, out_txt = model(pixel_values, input_ids, attention_mask)`` and the evaluator's cosine."""
    model = IVT(_config_from_case(case.config)).eval()
    fill_module(model, case.keys)
    pixel_values = torch.from_numpy(case.inputs["pixel_values"])
    input_ids = torch.from_numpy(case.inputs["input_ids"])
    attention_mask = torch.from_numpy(case.inputs["attention_mask"])
    with torch.inference_mode():
        out_vis, out_txt = model(pixel_values, input_ids, attention_mask)
    similarity = F.normalize(out_txt, dim=1) @ F.normalize(out_vis, dim=1).t()
    return {"out_vis": out_vis.numpy(), "out_txt": out_txt.numpy(), "similarity": similarity.numpy()}


def run_preprocess(case: ParityCase) -> dict[str, Any]:
    """Official test transform per PNG (output ``pixel_values_<file stem>``) and the batch tokenisation."""
    outputs: dict[str, Any] = {}
    image_size = tuple(case.config.get("image_size", IVTConfig().image_size))
    for name, spec in case.raw["inputs"].items():
        if isinstance(spec, dict) and spec.get("kind") == "png":
            stem = Path(spec["file"]).stem
            outputs[f"pixel_values_{stem}"] = preprocess_image(case.inputs[name], image_size).numpy()  # type: ignore[arg-type]
    input_ids, attention_mask = tokenize_captions(case.inputs["text"])  # official: no truncation
    outputs["input_ids"] = input_ids.numpy()
    outputs["attention_mask"] = attention_mask.numpy()
    outputs["lengths"] = attention_mask.sum(dim=1).numpy()
    return outputs


def run_losses(case: ParityCase) -> dict[str, Any]:
    """Official CMPM loss on raw features."""
    loss = cmpm_loss(
        torch.from_numpy(case.inputs["image_embeddings"]),
        torch.from_numpy(case.inputs["text_embeddings"]),
        torch.from_numpy(np.asarray(case.inputs["labels"])),
        epsilon=float(case.config.get("epsilon", 1e-8)),
    )
    return {"loss": float(loss)}


def run_metrics(case: ParityCase) -> dict[str, Any]:
    """Official evaluators: ``R1_mAP_CUHK`` ([::2] gallery) or ``R1_mAP_ICFG`` (all rows)."""
    evaluator = case.config["evaluator"]
    if evaluator not in ("R1_mAP_CUHK", "R1_mAP_ICFG"):
        raise ValueError(f"unknown IVT evaluator {evaluator!r}")
    metrics = official_ivt_metrics(
        case.inputs["image_feats"], case.inputs["text_feats"], case.inputs["pids"],
        paired_gallery=evaluator == "R1_mAP_CUHK",
    )
    return {**metrics.as_dict(), "cmc": metrics.cmc}


RUNNERS = {"encode": run_encode, "preprocess": run_preprocess, "losses": run_losses, "metrics": run_metrics}
