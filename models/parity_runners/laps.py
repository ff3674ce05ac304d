"""Parity runners for LAPS (CrossmodalGroup/LAPS @ 355a43b): kinds ``sim``, ``preprocess``, ``losses``, ``metrics``.

Each runner reads what it needs (config, inputs, official key list) from the case, so new cases of a known
kind run unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from models.laps import (
    LapsConfig,
    LapsModel,
    build_official_state_dict,
    collate_captions,
    load_official_state_dict,
    preprocess_image,
    tokenize_caption,
)
from models.laps_scoring import LapsCaptionState, score_block
from models.parity import Checked, ParityCase, crc32_normal_fill
from models.tokenizers import bert_tokenizer
from training.laps_metrics import contrastive_loss, i2t_recall, ratio_loss, t2i_recall


def _config_from_case(config: dict[str, Any]) -> LapsConfig:
    return LapsConfig.from_options({
        "vit_type": config.get("vit_type", "vit"),
        "embed_size": config.get("embed_size", 512),
        "sparse_ratio": config.get("sparse_ratio", 0.5),
        "aggr_ratio": config.get("aggr_ratio", 0.4),
        "max_word": config.get("max_word", 90),
    })


def run_sim(case: ParityCase) -> dict[str, Any]:
    """Official model filled by the parity rule under the official names, loaded through the checkpoint filter;
    embeddings from both encoders, then the cross-net similarity of every (image, caption) and the kept mask."""
    config = _config_from_case(case.config)
    model = LapsModel(config).eval()
    if case.keys is None:
        raise ValueError("sim cases need the official key list")
    state = build_official_state_dict(model, case.keys, crc32_normal_fill)
    load_official_state_dict(model, state, case.label)
    pixel_values = torch.from_numpy(case.inputs["pixel_values"])
    input_ids = torch.as_tensor(np.asarray(case.inputs["input_ids"]), dtype=torch.long)
    lengths = torch.as_tensor(np.asarray(case.inputs["lengths"]), dtype=torch.long)
    with torch.no_grad():
        img_embs, cap_embs = model.forward_emb(pixel_values, input_ids)
        images = model.cross_net.image_states(img_embs)
        captions = LapsCaptionState.from_embeddings(cap_embs, lengths, config.max_word)
        result = score_block(images, captions, model.cross_net.keep_k, return_keep=True)
    return {
        "img_embs": img_embs.numpy(),
        "cap_embs": cap_embs.numpy(),
        "sims": result.scores.numpy(),
        "score_mask": result.keep.transpose(0, 1).numpy(),  # official layout [B_t, B_v, N]
    }


def _exact(expected: Any, actual: Any) -> Checked:
    """Exact comparison of (possibly ragged) nested integer lists."""
    same = _as_list(actual) == _as_list(expected)
    return Checked(same, 0.0 if same else math.inf, "" if same else "differs")


def _as_list(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_as_list(v) for v in value]
    return value


def run_preprocess(case: ParityCase) -> dict[str, Any]:
    """Eval image transform per png input, caption token ids / tokens, and the collate (sort + zero-pad)."""
    out: dict[str, Any] = {}
    for name, value in case.inputs.items():
        if hasattr(value, "convert"):  # a PIL image
            out[f"pixel_values_{name}"] = preprocess_image(value).numpy()
    captions = case.inputs["captions"]
    ids = [tokenize_caption(c) for c in captions]
    tokens = [bert_tokenizer().convert_ids_to_tokens(row) for row in ids]
    padded, lengths, order = collate_captions(ids)
    expected = case.outputs
    out["ids"] = _exact(expected["ids"]["value"], ids) if "ids" in expected else ids
    out["tokens"] = tokens
    out["collate_input_ids"] = padded.numpy()
    out["collate_lengths"] = lengths.numpy()
    out["collate_order"] = np.asarray(order, dtype=np.int64)
    return out


def run_losses(case: ParityCase) -> dict[str, Any]:
    """``ContrastiveLoss`` (sum and max-violation) and the ratio term of the official training forward."""
    cfg = case.config
    scores = torch.from_numpy(case.inputs["scores"])
    img_ids = torch.as_tensor(np.asarray(case.inputs["img_ids"]), dtype=torch.long)
    margin = float(cfg.get("margin", 0.2))
    out: dict[str, Any] = {
        "loss_sum": float(contrastive_loss(scores, img_ids, margin, max_violation=False)),
        "loss_max_violation": float(contrastive_loss(scores, img_ids, margin, max_violation=True)),
    }
    weight = float(cfg.get("ratio_weight", 2.0))
    for backbone in ("vit", "swin"):
        if f"ratio_img_embs_{backbone}" not in case.inputs:
            continue
        num_patches = int(cfg[f"num_patches_{backbone}"])
        rho = float(cfg[f"sparse_ratio_{backbone}"])
        keep = _official_training_keep(case, backbone, num_patches, rho)
        value = float(ratio_loss(keep, rho))
        out[f"ratio_loss_{backbone}"] = value
        out[f"weighted_ratio_loss_{backbone}"] = float(weight * ratio_loss(keep, rho))
    return out


def _official_training_keep(case: ParityCase, backbone: str, num_patches: int, rho: float) -> torch.Tensor:
    """The kept mask [B_t, B_v, N] of the cross-net in training mode on the case's random embeddings."""
    cfg = case.config
    config = LapsConfig(backbone=backbone, embed_size=int(cfg.get("embed_size", 512)), sparse_ratio=rho,
                        aggr_ratio=0.4 if backbone == "vit" else 0.6)
    if config.num_patches != num_patches:
        raise ValueError(f"{backbone}: expected {num_patches} patches, config gives {config.num_patches}")
    from models.laps import CrossSparseAggrNet  # local: only this runner needs the bare cross-net

    net = CrossSparseAggrNet(config, num_patches)
    with torch.no_grad():
        for name, tensor in net.state_dict(keep_vars=True).items():
            tensor.data.copy_(torch.from_numpy(crc32_normal_fill(f"cross_net.{name}", tensor.shape)))
    net.train()
    img = torch.from_numpy(case.inputs[f"ratio_img_embs_{backbone}"])
    cap = torch.from_numpy(case.inputs["ratio_cap_embs"])
    lens = torch.as_tensor(np.asarray(case.inputs["ratio_cap_lens"]), dtype=torch.long)
    _, keep = net(img, cap, lens)
    return keep


def run_metrics(case: ParityCase) -> dict[str, Any]:
    """``i2t`` / ``t2i`` (coco mode, 5 captions per image) and rsum."""
    sims = np.asarray(case.inputs["sims"], dtype=np.float32)
    npts = int(case.config.get("npts", sims.shape[0]))
    per_image = int(case.config.get("captions_per_image", 5))
    (r1, r5, r10, medr, meanr), ranks_i2t = i2t_recall(sims, npts, per_image)
    (ri1, ri5, ri10, medri, meanri), ranks_t2i = t2i_recall(sims, npts, per_image)
    return {
        "i2t_r1": r1, "i2t_r5": r5, "i2t_r10": r10, "i2t_medr": medr, "i2t_meanr": meanr,
        "t2i_r1": ri1, "t2i_r5": ri5, "t2i_r10": ri10, "t2i_medr": medri, "t2i_meanr": meanri,
        "rsum": r1 + r5 + r10 + ri1 + ri5 + ri10,
        "ranks_i2t": ranks_i2t.astype(np.int64), "ranks_t2i": ranks_t2i.astype(np.int64),
    }


RUNNERS = {"sim": run_sim, "preprocess": run_preprocess, "losses": run_losses, "metrics": run_metrics}
