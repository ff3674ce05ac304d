"""Parity runners for ViLT-B/32 (dandelin/ViLT @ 762fd397), the backbone ScanFormer starts from."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from models.parity import ParityCase, fill_module
from models.vilt import ViltConfig, ViltModel


def build_vilt(config: dict[str, Any]) -> ViltModel:
    """A :class:`ViltModel` from a case's ``config`` (ViLT names: hidden_size, num_layers, ...)."""
    pos_grid = config.get("pos_grid", [12, 12])
    cfg = ViltConfig(
        vocab_size=int(config.get("vocab_size", 30522)),
        hidden_size=int(config.get("hidden_size", 768)),
        num_layers=int(config.get("num_layers", 12)),
        num_heads=int(config.get("num_heads", 12)),
        mlp_ratio=int(config.get("mlp_ratio", 4)),
        patch_size=int(config.get("patch_size", 32)),
        pos_grid=int(pos_grid[0] if isinstance(pos_grid, list) else pos_grid),
        max_text_len=int(config.get("max_text_len", 40)),
        layer_norm_eps=float(config.get("layer_norm_eps_blocks", 1e-6)),
        bert_layer_norm_eps=float(config.get("layer_norm_eps_bert_embeddings", 1e-12)),
        qkv_bias=bool(config.get("qkv_bias", True)),
        drop_rate=0.0,
    )
    return ViltModel(cfg)


def run_encode(case: ParityCase) -> dict[str, Any]:
    """``ViLTransformerSS.infer`` with every patch kept; image outputs in raster patch order."""
    model = build_vilt(case.config)
    fill_module(model, case.keys)
    model.eval()
    text_ids = torch.from_numpy(np.asarray(case.inputs["text_ids"], dtype=np.int64))
    text_masks = torch.from_numpy(np.asarray(case.inputs["text_masks"], dtype=np.int64))
    pixel_values = torch.from_numpy(case.inputs["pixel_values"])
    with torch.no_grad():
        out = model(text_ids, text_masks, pixel_values)
    return {name: out[name].numpy() for name in ("text_feats", "image_feats", "pooled", "co_embeds")}


RUNNERS = {"encode": run_encode}
