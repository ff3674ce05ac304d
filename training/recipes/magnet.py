"""MagNet training recipe. The release has no training code (research notes section 5); the recipe is the
paper's objective on LAVT's optimisation, which the released ``args.py`` keeps:

- loss: ``2.0 BCE + 2.0 Dice`` on the mask (upsampled bilinearly with ``align_corners=True``, as evaluated);
  the paper's two auxiliary terms are options (``grounding_weight``, ``cal_weight``; the ``paper`` preset
  turns both on) computed by modules that live only here, so checkpoints keep the official layout:
  * Mask Grounding (``MaskGroundingHead``): tokens of the expression are masked (ovr-cnn style, as the author
    points to: each word piece with p = 0.15, then [MASK] with p = 0.9, else kept); the masked expression runs
    through MagNet (so the visual features cannot leak the hidden words); the GT mask's centre goes through a
    2-layer MLP; the final language features are projected to the visual width; a BERT-like transformer
    predicts the masked tokens from the concatenated language, visual (1/32 pixel-decoder map) and mask
    embeddings; cross-entropy on the masked positions. Weight 1.0 in the paper.
  * CAL (``cross_modal_alignment_loss``): pixel-to-pixel (positive pixels pulled to the positive mean, negatives
    to the negative mean, each against the other set, temperature tau1) + pixel-to-text (positive pixels to the
    projected mean word feature ``lang_proj``, against the negative pixels, tau2); features L2-normalised; the
    usual ``-log`` contrastive form (the seed's rendering drops the log). lambda, tau1, tau2 are not published:
    0.1 / 0.1 / 0.1 here [choice].
- optimiser: AdamW, lr 5e-5, weight decay 0.01; no decay on norms, absolute position embeddings and relative
  position bias tables (LAVT's groups). LAVT also leaves BERT layers 10-11 out of the optimiser; MagNet's own
  choice is unpublished, so every parameter trains here.
- schedule: poly ``(1 - it / total)^0.9`` per iteration; 40 epochs, batch 32 in total (4 x 8).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.deformable_attention import MSDeformAttn
from models.magnet import MagNet, MagNetConfig, tokenize_expressions
from models.tokenizers import bert_tokenizer
from training.datasets import (
    ReferDataset,
    demo_colour_free_augmentation,
    image_reader,
    magnet_train_transform,
    read_refer,
)
from training.trainer import Batch, Config, Losses, Recipe, StepContext, group_by, init_dense_layers, poly

MASK_TOKEN_ID, CLS_TOKEN_ID, SEP_TOKEN_ID, PAD_TOKEN_ID = 103, 101, 102, 0

OFFICIAL: Config = {
    "image_cache_mb": 0,  # MB of decoded images held in memory per data process (0: read every time)
    "grayscale_without_colour": 0.0,  # demo only: P(grayscale image | no colour word), GrayscaleWithoutColourWords
    "permute_channels_without_colour": False,  # demo only: PermuteChannelsWithoutColourWords
    "word_init_std": 0.0,  # demo only (scratch_init): std of the word embeddings; 0 keeps BERT's N(0, 0.02)
    "dataset": "refcoco", "split_by": "unc", "epochs": 40, "batch_size": 32, "num_workers": 0, "log_every": 50,
    "save_every": 0, "seed": 0, "clip_grad_norm": None,
    "model": MagNetConfig().to_dict(),
    "lr": 5e-5, "weight_decay": 0.01, "poly_power": 0.9,
    "bce_weight": 2.0, "dice_weight": 2.0, "grounding_weight": 0.0, "cal_weight": 0.0, "cal_tau1": 0.1,
    "cal_tau2": 0.1, "mask_prob": 0.15, "mask_token_prob": 0.9, "grounding_layers": 2, "export_fp16": False,
    "epoch_samples": None,
}
PAPER: Config = {**OFFICIAL, "grounding_weight": 1.0, "cal_weight": 0.1}

SMALL_MODEL: dict[str, Any] = {
    **MagNetConfig().to_dict(), "img_size": 96, "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8],
    "window_size": 7, "hidden_size": 32, "lang_heads": 2, "lang_ffn": 64, "max_position_embeddings": 32,
    "lang_stage_ends": [1, 2, 3, 4], "decoder_dim": 32, "mask_dim": 32, "decoder_heads": 4, "group_norm_groups": 8,
    "pixel_decoder_layers": 1, "pixel_decoder_ffn": 64, "decoder_layers": 3, "decoder_ffn": 64,
}
# The Swin-B / BERT-base graph shrunk (Swin width 16, one block per stage, BERT width 32, 1 BERT layer per
# stage, 3 decoder layers) at 96 px, from random weights (the release starts from ImageNet-22k Swin and
# BERT). Deviations from the official recipe (also in the demo manifest's note): ``scratch_init`` (the
# upstream inits instead of PyTorch's defaults), lr 1e-3, window 6 (96 px gives 24/12/6/3 token maps, which
# window 7 would pad to 28/14/7/7), 6 epochs of 4480 samples at batch 16 (1680 steps, about 0.35 s each on one
# idle CPU thread: about 10 min), fp16 export. Held-out mIoU after 3 epochs 37.6, after 6 46.4 (in-distribution
# val 59.0: the gap is expressions about colour-shape pairs never seen in training); BERT width 64 did not help.
# Held out by expression type (mIoU): with a colour word 63.0, else with a location 48.2, else with a size
# 34.3, the shape alone 14.2 - 59% of the shape-only masks cover another object: the model finds shapes
# through the colours they had in training. The paper's CAL term at 0.1 gave 45.6 (not kept). 9 epochs: 44.0
# (train mIoU 58.6; longer training does not carry over to the unseen pairs). The paper's Mask Grounding loss
# (weight 1) for 3 epochs: 42.2, against 37.6 without it at 3 epochs, but each step costs 2.4 times as much, so
# at equal time it stays below the 6 plain epochs. Swin width 32 (stages 32 / 64 / 128 / 256) gave 30.0 on
# another machine, where this preset gave 38.6 (cut by its time cap at 1502 steps); there a step took 0.92 s
# against this preset's 0.86 s (each alongside another training run).
# Grey-scale images for half the expressions without a colour word (``grayscale_without_colour`` 0.5; no
# colour-shape pair is created and the referent is still named without colour) make it find shapes by their
# outlines. Side by side on an AMD EPYC family 25 model 1 (one thread each; ``training.evaluate mask --by-cue``
# figures), held-out mIoU without -> with, seed 0: 35.77 -> 41.76, seed 1: 40.78 -> 52.47, seed 2: 28.61 ->
# 39.03; shape-only expressions 15.9 -> 30.9, 15.5 -> 36.9, 14.8 -> 23.6. On the first machine (seed 0)
# 46.4 -> 39.8, shape-only 14.2 -> 29.2. Every such image grey-scale (1.0), seed 0: 37.64.
# Word embeddings N(0, 0.1) (``word_init_std``; at the upstream N(0, 0.02) the word, position and type tables
# are equally large, so after the LayerNorm one word at two positions has cosine 0.58): with the grey-scale
# option, seed 0 on the same machine 49.62 (shape-only 25.4, size 45.1) against 41.76 with the grey-scale
# option alone; seed 1 51.31 against 52.47, so the word part is within a seed's noise. This preset uses both.
# Later, on an AMD EPYC family 26 model 2 (where this preset gives 48.79 with seed 0 and 53.62 with seed 1):
# mirroring half the samples with 'left' and 'right' swapped in the text (VG-LAW's flip, which ScanFormer's
# pipeline has; LAVT trains without it), against location errors (location expressions are 57% of the held-out
# ones, mIoU 50.0 there): 47.32 and 46.42 (location 52.4 / 51.8 against 50.0 / 56.5). Not kept, nor the option.
# On an AMD EPYC family 25 model 17 (the same rounding as the family 26 machine): four times the training
# scenes (8000 generated with the same seed and held-out pairs, the same 1680 steps), evaluated on the usual
# test split: 41.70 (colour 76.5, location 35.7) - more distinct scenes did not carry over to the unseen pairs.
# Channel orders instead of grey-scale (``permute_channels_without_colour``): every sample whose expression names
# no colour gets its RGB channels in a random order (6 orders, identity included), so shapes appear in other hues
# while the image stays in colour, as at test time. On an AMD EPYC family 25 model 1, where the preset with the
# grey-scale option gave 49.62 (seed 0) and 51.31 (seed 1): channel orders alone 58.94 / 58.28 / 61.74 (seeds
# 0 / 1 / 2; shape alone 41.6 / 43.6 / 43.6 against 25.4; location 58.8 / 60.1 / 63.5 against 50-51); channel
# orders plus grey-scale 0.5, seed 0: 57.27. With channel orders the seventh epoch helps (it did not with the
# grey-scale option, which fits the training pairs): 7 epochs gave 61.28 / 58.75 (seeds 0 / 1) against 58.94 /
# 58.28 at 6. The preset uses channel orders alone and 7 epochs (1960 steps); MagNet's queue has the room.
DEMO: Config = {**OFFICIAL, "dataset": "refsynth", "epochs": 7, "epoch_samples": 4480, "batch_size": 16,
                "log_every": 10, "lr": 1e-3, "permute_channels_without_colour": True, "word_init_std": 0.1,
                "model": {**SMALL_MODEL, "window_size": 6}, "export_fp16": True, "scratch_init": True,
                "image_cache_mb": 1024,  # the demo data fits decoded in memory
                "demo_note": "from random weights (no ImageNet Swin / BERT) with scratch_init (upstream inits); "
                             "Swin width 16, 1 block per stage, window 6, BERT width 32, 3 decoder layers, 96 px; "
                             "word embeddings N(0, 0.1); lr 1e-3, batch 16, 7 epochs of 4480 samples; RGB channels in "
                             "a random order when the expression names no colour (permute_channels_without_colour, "
                             "a demo training aid); fp16 export; refer data generator 2 (2-3 larger objects per "
                             "scene)"}
TINY: Config = {**DEMO, "epochs": 1, "epoch_samples": None, "batch_size": 4, "lr": 2e-3, "grounding_weight": 1.0,
                "cal_weight": 0.1,
                "model": {**SMALL_MODEL, "img_size": 64, "decoder_layers": 1}}


# ----------------------------------------------------------------------------------------------- paper losses


class MaskGroundingHead(nn.Module):
    """Training-only Mask Grounding branch (paper Sec. 3.1): mask-centre MLP, language projection, a BERT-like
    masked-token predictor over [language; visual; mask] tokens and an MLM head over the BERT vocabulary."""

    def __init__(self, config: MagNetConfig, layers: int = 2):
        super().__init__()
        dim = config.decoder_dim
        self.mask_encoder = nn.Sequential(nn.Linear(2, dim), nn.ReLU(), nn.Linear(dim, dim))  # 2-layer MLP
        self.language_proj = nn.Linear(config.hidden_size, dim)
        self.type_embed = nn.Embedding(3, dim)  # language / visual / mask segments
        block = nn.TransformerEncoderLayer(dim, config.decoder_heads, config.decoder_ffn, dropout=0.0,
                                           activation="gelu", batch_first=True)  # post-LN, as BERT
        self.predictor = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.mlm_head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim),
                                      nn.Linear(dim, config.vocab_size))

    def forward(self, language: torch.Tensor, attention_mask: torch.Tensor, visual: torch.Tensor,
                mask_centres: torch.Tensor) -> torch.Tensor:
        """language [B, T, H], visual [B, C, h, w], centres [B, 2] in [0, 1] -> vocabulary logits [B, T, V]."""
        lang = self.language_proj(language) + self.type_embed.weight[0]
        vis = visual.flatten(2).transpose(1, 2) + self.type_embed.weight[1]
        mask = self.mask_encoder(mask_centres).unsqueeze(1) + self.type_embed.weight[2]
        tokens = torch.cat([lang, vis, mask], dim=1)
        pad = torch.cat([attention_mask == 0, attention_mask.new_zeros(vis.shape[0], vis.shape[1] + 1).bool()], 1)
        hidden = self.predictor(tokens, src_key_padding_mask=pad)
        return self.mlm_head(hidden[:, : language.shape[1]])


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, prob: float, mask_prob: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """ovr-cnn ``word_embedding.py`` masking: each real word piece (not [CLS]/[SEP]/[PAD]) is selected with
    ``prob``; a selected piece becomes [MASK] with ``mask_prob``, else stays. At least one piece per expression
    is selected (the first). Returns (masked ids, labels with -100 where not selected)."""
    eligible = (attention_mask == 1) & (input_ids != CLS_TOKEN_ID) & (input_ids != SEP_TOKEN_ID)
    selected = (torch.rand(input_ids.shape, device=input_ids.device) < prob) & eligible
    none = ~selected.any(dim=1) & eligible.any(dim=1)
    first = eligible.float().argmax(dim=1)
    selected[none, first[none]] = True
    replace = selected & (torch.rand(input_ids.shape, device=input_ids.device) < mask_prob)
    masked = torch.where(replace, torch.full_like(input_ids, MASK_TOKEN_ID), input_ids)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
    return masked, labels


def cross_modal_alignment_loss(pixels: torch.Tensor, target: torch.Tensor, text: torch.Tensor, tau1: float,
                               tau2: float) -> torch.Tensor:
    """CAL = P2P + P2T (paper eq. for L_CAL) in ``-log`` form, averaged over the samples that have both
    positive and negative pixels. pixels [B, C, h, w], target [B, h, w] in {0, 1}, text [B, C]."""
    pixels = F.normalize(pixels.float(), dim=1)
    text = F.normalize(text.float(), dim=-1)
    losses = []
    for b in range(pixels.shape[0]):
        feats = pixels[b].flatten(1).t()  # [hw, C]
        positive = feats[target[b].flatten() > 0]
        negative = feats[target[b].flatten() == 0]
        if len(positive) == 0 or len(negative) == 0:
            continue
        pos_mean = F.normalize(positive.mean(0), dim=0)
        neg_mean = F.normalize(negative.mean(0), dim=0)
        pos_neg = positive @ negative.t()  # [P, N]

        def contrast(anchor_logit: torch.Tensor, others: torch.Tensor, tau: float) -> torch.Tensor:
            """-log(e^{a/tau} / (e^{a/tau} + sum_j e^{o_j/tau})), per row."""
            logits = torch.cat([anchor_logit[:, None], others], dim=1) / tau
            return -(logits[:, 0] - torch.logsumexp(logits, dim=1))

        p2p = contrast(positive @ pos_mean, pos_neg, tau1).mean() + contrast(negative @ neg_mean, pos_neg.t(),
                                                                             tau1).mean()
        p2t = contrast(positive @ text[b], pos_neg, tau2).mean()
        losses.append(p2p + p2t)
    if not losses:
        return pixels.sum() * 0.0
    return torch.stack(losses).mean()


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mask2Former ``dice_loss``: ``1 - (2 sum(p g) + 1) / (sum p + sum g + 1)`` per mask, averaged."""
    probs = logits.sigmoid().flatten(1)
    target = target.flatten(1)
    return (1 - (2 * (probs * target).sum(1) + 1) / (probs.sum(1) + target.sum(1) + 1)).mean()


def scratch_init(model: MagNetTrainModel, word_std: float = 0.0) -> None:
    """Initialisation for training from random weights (demo only; the release starts from ImageNet Swin and
    BERT): the upstream inits of each part instead of PyTorch's defaults - Linear weights truncated
    N(0, 0.02) with zero biases (Swin / BERT / Mask2Former), Embedding N(0, 0.02) (BERT), LayerNorm 1 / 0, and
    Deformable DETR's ``MSDeformAttn._reset_parameters`` (zero offset weights with a ring of initial sampling
    directions as biases, uniform attention weights, Xavier value / output projections). ``word_std`` > 0
    draws the BERT word embeddings from N(0, word_std) instead, so that a word outweighs its position."""
    init_dense_layers(model, lambda linear: nn.init.trunc_normal_(linear.weight, std=0.02))
    if word_std:
        nn.init.normal_(model.magnet.language_model.embeddings.word_embeddings.weight, std=word_std)
    for module in model.modules():
        if isinstance(module, MSDeformAttn):
            nn.init.zeros_(module.sampling_offsets.weight)
            angles = torch.arange(module.heads, dtype=torch.float32) * (2.0 * math.pi / module.heads)
            grid = torch.stack([angles.cos(), angles.sin()], -1)
            grid = grid / grid.abs().max(-1, keepdim=True)[0]
            grid = grid.view(module.heads, 1, 1, 2).repeat(1, module.levels, module.points, 1)
            grid = grid * torch.arange(1, module.points + 1, dtype=torch.float32).view(1, 1, -1, 1)
            with torch.no_grad():
                module.sampling_offsets.bias.copy_(grid.flatten())
            nn.init.zeros_(module.attention_weights.weight)
            nn.init.zeros_(module.attention_weights.bias)
            for proj in (module.value_proj, module.output_proj):
                nn.init.xavier_uniform_(proj.weight)
                nn.init.zeros_(proj.bias)


class MagNetTrainModel(nn.Module):
    """MagNet plus the training-only Mask Grounding branch (never exported)."""

    def __init__(self, config: MagNetConfig, with_grounding: bool, grounding_layers: int):
        super().__init__()
        self.magnet = MagNet(config)
        self.grounding = MaskGroundingHead(config, grounding_layers) if with_grounding else None


class MagNetRecipe(Recipe):
    name = "magnet"
    schedule_unit = "step"
    export_name = "magnet.pth"
    word_embedding_key = "language_model.embeddings.word_embeddings.weight"
    configs = {"official": OFFICIAL, "paper": PAPER, "demo": DEMO, "tiny": TINY}

    def model_config(self, config: Config) -> MagNetConfig:
        return MagNetConfig.from_dict(dict(config["model"]))

    def vocabulary_rows(self, texts: list[str], config: Config) -> set[int] | None:
        """The texts' rows, plus [MASK] when Mask Grounding masks words."""
        rows = self.text_token_ids(texts, config)
        return rows | {MASK_TOKEN_ID} if config["grounding_weight"] > 0 else rows

    def build_model(self, config: Config) -> nn.Module:
        model = MagNetTrainModel(self.model_config(config), config["grounding_weight"] > 0,
                                 int(config["grounding_layers"]))
        if config.get("scratch_init"):
            scratch_init(model, float(config.get("word_init_std", 0.0)))
        return model

    def train_dataset(self, data_dir: Path, config: Config) -> ReferDataset:
        refer = read_refer(data_dir, config["dataset"], config["split_by"])
        transform = demo_colour_free_augmentation(magnet_train_transform(config["model"]["img_size"]),
                                                  config.get("grayscale_without_colour", 0.0),
                                                  bool(config.get("permute_channels_without_colour", False)))
        return ReferDataset(refer, "train", unit="ref", transform=transform,
                            image_reader=image_reader(config.get("image_cache_mb", 0)))

    def collate(self, samples: list[dict[str, Any]], config: Config) -> Batch:
        ids, mask = tokenize_expressions([s["text"] for s in samples], bert_tokenizer(),
                                         int(config["model"]["max_tokens"]))
        return {"images": torch.stack([s["image"] for s in samples]), "input_ids": ids, "attention_mask": mask,
                "masks": torch.stack([s["mask"] for s in samples]).float()}

    def param_groups(self, model: nn.Module, config: Config) -> list[dict[str, Any]]:
        def settings(name: str) -> dict[str, Any]:  # LAVT train.py: no decay on norms / position tables
            no_decay = "norm" in name or "absolute_pos_embed" in name or "relative_position_bias_table" in name
            return {"weight_decay": 0.0 if no_decay else config["weight_decay"]}

        return group_by(model, settings)

    def optimizer(self, groups: list[dict[str, Any]], config: Config) -> torch.optim.Optimizer:
        return torch.optim.AdamW(groups, lr=config["lr"], weight_decay=config["weight_decay"])

    def lr_multiplier(self, config: Config, steps_per_epoch: int) -> Any:
        return poly(steps_per_epoch * int(config["epochs"]), config["poly_power"])

    def _features(self, magnet: MagNet, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
                  ) -> dict[str, Any]:
        """The official forward, keeping the pixel decoder maps and the language features."""
        features, words = magnet.fuse(pixels, ids, mask)
        mask_features, multi_scale = magnet.classifier.pixel_decoder(features)
        out = dict(magnet.classifier.predictor(multi_scale, mask_features))
        out.update(mask_features=mask_features, coarse=multi_scale[0], language=words)
        return out

    def loss(self, model: nn.Module, batch: Batch, ctx: StepContext) -> Losses:
        cfg = ctx.config
        wrapper: MagNetTrainModel = model  # type: ignore[assignment]
        magnet = wrapper.magnet
        target = batch["masks"]
        out = self._features(magnet, batch["images"], batch["input_ids"], batch["attention_mask"])
        logits = F.interpolate(out["pred_masks"].float(), size=target.shape[-2:], mode="bilinear",
                               align_corners=True)[:, 0]
        result: Losses = {
            "bce_loss": cfg["bce_weight"] * F.binary_cross_entropy_with_logits(logits, target),
            "dice_loss": cfg["dice_weight"] * dice_loss(logits, target),
        }
        with torch.no_grad():
            pred = logits > 0
            inter = (pred & (target > 0)).flatten(1).sum(1).float()
            union = (pred | (target > 0)).flatten(1).sum(1).float()
            result["train_miou"] = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter)).mean()
        if cfg["cal_weight"] > 0:
            small = F.interpolate(target[:, None], size=out["mask_features"].shape[-2:], mode="nearest")[:, 0]
            words = out["language"]
            valid = batch["attention_mask"].unsqueeze(-1).to(words.dtype)
            mean_word = (words * valid).sum(1) / valid.sum(1).clamp(min=1)
            text = magnet.lang_proj(mean_word)  # the checkpoint's otherwise unused projection
            result["cal_loss"] = cfg["cal_weight"] * cross_modal_alignment_loss(
                out["mask_features"], small, text, cfg["cal_tau1"], cfg["cal_tau2"])
        if cfg["grounding_weight"] > 0 and wrapper.grounding is not None:
            masked_ids, labels = mask_tokens(batch["input_ids"], batch["attention_mask"], cfg["mask_prob"],
                                             cfg["mask_token_prob"])
            masked = self._features(magnet, batch["images"], masked_ids, batch["attention_mask"])
            area = target.flatten(1).sum(1).clamp(min=1)
            ys = torch.linspace(0, 1, target.shape[-2], device=target.device)
            xs = torch.linspace(0, 1, target.shape[-1], device=target.device)
            centres = torch.stack([(target.sum(1) * xs).sum(1) / area, (target.sum(2) * ys).sum(1) / area], dim=1)
            vocab_logits = wrapper.grounding(masked["language"], batch["attention_mask"], masked["coarse"], centres)
            result["grounding_loss"] = cfg["grounding_weight"] * F.cross_entropy(
                vocab_logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return result

    def export(self, model: nn.Module, path: Path, config: Config, info: dict[str, Any]) -> None:
        """``{'model': state_dict}`` as the release, plus ``config`` / ``img_size`` for non-default sizes; the
        Mask Grounding branch is training-only and left out."""
        magnet: MagNet = model.magnet  # type: ignore[assignment]
        state = {k: v.detach().cpu().clone() for k, v in magnet.state_dict().items()}
        if config["export_fp16"]:
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        cfg = magnet.config.to_dict()
        torch.save({"model": state, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
                    "img_size": int(magnet.config.img_size), "epoch": int(info["epoch"])}, path)
