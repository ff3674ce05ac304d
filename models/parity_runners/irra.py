"""Parity runners for IRRA: each builds what its case's config describes and returns the recorded outputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.irra import (
    IRRA,
    IRRAConfig,
    apply_precision,
    compute_id,
    compute_mlm,
    compute_sdm,
    image_global_feature,
    preprocess_image,
    text_global_feature,
)
from models.parity import ParityCase, fill_module
from training.person_metrics import rank


def _filled_model(case: ParityCase, precision: str = "fp32") -> IRRA:
    """IRRA from the case config, checked against the official key list, filled in float32, then put
    into the precision (the official convert_weights runs after the fill, as in the recording)."""
    model = IRRA(IRRAConfig.from_dict(case.config)).eval()
    fill_module(model, case.keys)
    return apply_precision(model, precision)


def _encode(case: ParityCase, precision: str) -> dict[str, Any]:
    model = _filled_model(case, precision)
    pixel_values = torch.from_numpy(case.inputs["pixel_values"])
    input_ids = torch.from_numpy(case.inputs["input_ids"])
    with torch.no_grad():  # one forward per tower; the global features are read off the token outputs
        image_tokens = model.base_model.encode_image(pixel_values)
        text_tokens = model.base_model.encode_text(input_ids)
    image_feats = image_global_feature(image_tokens)
    text_feats = text_global_feature(text_tokens, input_ids)
    similarity = F.normalize(text_feats, p=2, dim=1) @ F.normalize(image_feats, p=2, dim=1).t()
    return {
        "image_tokens": image_tokens.float(),
        "text_tokens": text_tokens.float(),
        "image_feats": image_feats,
        "text_feats": text_feats,
        "similarity": similarity,
        "eot_index": input_ids.argmax(dim=-1).tolist(),
    }


def run_encode(case: ParityCase) -> dict[str, Any]:
    """float32 ``encode_image`` / ``encode_text`` and their token outputs, plus the Evaluator cosine."""
    return _encode(case, "fp32")


def run_encode_mixed(case: ParityCase) -> dict[str, Any]:
    """The same in the official fp16/fp32 placement (``convert_weights``)."""
    return _encode(case, "official")


def run_mlm(case: ParityCase) -> dict[str, Any]:
    """IRR/MLM branch: encode_text(mlm_ids) -> cross_former with the full image tokens -> mlm_head."""
    model = _filled_model(case)
    pixel_values = torch.from_numpy(case.inputs["pixel_values"])
    mlm_ids = torch.from_numpy(case.inputs["mlm_ids"])
    labels = torch.from_numpy(case.inputs["mlm_labels"]).reshape(-1)
    with torch.no_grad():
        image_tokens = model.base_model.encode_image(pixel_values)
        text_tokens = model.base_model.encode_text(mlm_ids)
        cross = model.cross_former(text_tokens, image_tokens, image_tokens)
        scores = model.mlm_scores(mlm_ids, image_tokens, text_tokens)
        loss = compute_mlm(scores, labels)
    selected = torch.nonzero(labels != 0).flatten()
    return {
        "mlm_scores": scores[selected],
        "mlm_pred": scores[selected].argmax(dim=1).tolist(),
        "cross_feats": cross.reshape(-1, cross.shape[-1])[selected].float(),
        "mlm_loss": float(loss),
        "selected_flat_index": selected.tolist(),
    }


def run_preprocess(case: ParityCase) -> dict[str, Any]:
    """Official test image transform of every ``image*`` input and the tokenizer on ``text``."""
    from models.clip_tokenizer import SOT_ID, IRRATokenizer, irra_tokenizer

    image_size = tuple(case.config.get("img_size", (384, 128)))
    context_length = int(case.config.get("context_length", 77))
    tokenizer: IRRATokenizer = irra_tokenizer(context_length)
    out: dict[str, Any] = {}
    image_names = sorted(name for name in case.inputs if name.startswith("image"))
    for name in image_names:
        index = name.removeprefix("image")
        out[f"pixel_values_{index}"] = preprocess_image(case.inputs[name], image_size)
    texts = case.inputs["text"]
    out["input_ids"] = tokenizer(texts)
    out["untruncated_length"] = [len([SOT_ID, *tokenizer.encode(t)]) + 1 for t in texts]
    return out


def run_losses(case: ParityCase) -> dict[str, Any]:
    """SDM, ID and MLM losses on given features/logits, and their sum (both loss weights 1.0)."""
    inputs = case.inputs
    cfg = case.config
    pids = torch.from_numpy(inputs["pids"])
    logit_scale = torch.tensor(float(np.asarray(inputs["logit_scale"]).reshape(-1)[0]))
    sdm = compute_sdm(torch.from_numpy(inputs["image_feats"]), torch.from_numpy(inputs["text_feats"]), pids,
                      logit_scale)
    id_loss = compute_id(torch.from_numpy(inputs["image_logits"]), torch.from_numpy(inputs["text_logits"]),
                         pids) * float(cfg.get("id_loss_weight", 1.0))
    mlm_labels = torch.from_numpy(inputs["mlm_labels"]).reshape(-1)
    mlm = compute_mlm(torch.from_numpy(inputs["mlm_scores"]), mlm_labels)
    mlm = mlm * float(cfg.get("mlm_loss_weight", 1.0))
    return {"sdm_loss": float(sdm), "id_loss": float(id_loss), "mlm_loss": float(mlm),
            "total": float(sdm + id_loss + mlm)}


def run_metrics(case: ParityCase) -> dict[str, Any]:
    """Official ``utils/metrics.rank`` (t2i): CMC (length min(max_rank, G)), R1/R5/R10 where defined,
    mAP, mINP and the full descending ranking."""
    result = rank(torch.from_numpy(case.inputs["similarity"]), torch.from_numpy(case.inputs["q_pids"]),
                  torch.from_numpy(case.inputs["g_pids"]), max_rank=int(case.config.get("max_rank", 10)),
                  return_indices=True)
    out: dict[str, Any] = {"cmc": result.cmc, "mAP": result.mAP, "mINP": result.mINP,
                           "indices": result.indices}
    out.update(result.recall_at((1, 5, 10)))
    return out


RUNNERS = {
    "encode": run_encode,
    "encode_mixed": run_encode_mixed,
    "mlm": run_mlm,
    "preprocess": run_preprocess,
    "losses": run_losses,
    "metrics": run_metrics,
}
