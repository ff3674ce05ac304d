"""MagNet: Mask-grounded Network for referring image segmentation (Chng et al., CVPR 2024).

Faithful inference model of the released code (yxchng/mask-grounding @ 2debc7ed, ``test.py: WrapperModel``),
loading the official ``magnet_*.pth`` files strictly (1310 entries, ``keys-swinb-window12.tsv``):

- ``image_model``: Swin-B, window 12, with the image side of the Cross-modal Alignment Module (CAM) after each
  stage (``models/magnet_swin.py``).
- ``language_model``: BERT-base split into four 3-layer stages; after stage k the language side of the fusion
  reads the stage-k image tokens and updates the words through a tanh gate (ReLU inside).
- ``classifier``: a Mask2Former head - multi-scale deformable-attention pixel decoder over the four CAM outputs
  (``models/deformable_attention.py``) and a 9-layer masked-attention decoder with a single query whose mask
  embedding is dotted with the stride-4 mask features.
- ``lang_proj``: in the checkpoints, unused at inference (kept so strict loading works).

The two modalities run in lockstep: image stage k, language stage k, image-side CAM (uses the words after
stage k), language-side fusion (uses the image tokens of stage k *before* the gated update).

Official quirks the released weights depend on (each is marked ``QUIRK`` where it happens):
1. The language-side fusion receives BERT's *extended* additive mask ``(1 - mask) * -10000`` instead of the
   binary mask, so valid words attend uniformly over pixels and pad words attend (almost) one-hot; the result
   depends on the pad count, hence inputs are always padded to exactly 20 tokens.
2. Class probabilities are not multiplied into the mask: the official ``semantic_inference`` takes the softmax
   over the size-1 query axis, which is exactly 1, so the mask probability is ``sigmoid(mask logits)``.
3. Mask logits (and the CAM pyramid branches) are upsampled bilinearly with ``align_corners=True``.
4. Swin pads feature maps to a window multiple instead of shrinking the window (``magnet_swin.py``).

Paper-only training pieces (Mask Grounding, the cross-modal alignment loss) are not in the release and are
not needed for inference.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from models.checkpoint import (
    file_version,
    find_state_dict,
    load_checkpoint_file,
    load_state_dict_strict,
    strip_prefix,
)
from models.deformable_attention import MSDeformAttnPixelDecoder, PositionEmbeddingSine
from models.magnet_swin import MultiModalSwin

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_TOKENS = 20  # official ReferDataset.max_tokens
EXTENDED_MASK_VALUE = -10000.0  # HF-3.x BertModel.get_extended_attention_mask


@dataclass
class MagNetConfig:
    """Architecture and input settings; the defaults are the released Swin-B / BERT-base model at 480 px."""

    img_size: int = 480  # 448 for magnet_all.pth
    embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 12
    mlp_ratio: float = 4.0
    fusion_heads: tuple[int, ...] = (1, 1, 1, 1)
    vocab_size: int = 30522
    hidden_size: int = 768
    lang_heads: int = 12
    lang_ffn: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    lang_stage_ends: tuple[int, ...] = (3, 6, 9, 12)  # official pwam_idx: BERT layers [0,3), [3,6), ...
    max_tokens: int = MAX_TOKENS
    decoder_dim: int = 256
    mask_dim: int = 256
    decoder_heads: int = 8
    pixel_decoder_layers: int = 4
    pixel_decoder_ffn: int = 1024
    decoder_layers: int = 9  # official DEC_LAYERS 10, minus one
    decoder_ffn: int = 2048
    num_queries: int = 1
    num_classes: int = 1
    group_norm_groups: int = 32

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MagNetConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown MagNet config keys: {unknown}")
        converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**converted)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------- BERT


class BertEmbeddings(nn.Module):
    """Word + position (0..T-1) + token-type (all 0) embeddings, LayerNorm eps 1e-12; no position_ids buffer."""

    def __init__(self, config: MagNetConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=1e-12)  # official (TF) name

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        token_types = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None] \
            + self.token_type_embeddings(token_types)
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, extended_mask: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        d = c // self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, d).permute(0, 2, 1, 3)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d) + extended_mask
        context = scores.softmax(dim=-1) @ v
        return context.permute(0, 2, 1, 3).reshape(b, t, c)


class BertDenseLayerNorm(nn.Module):
    """``dense`` then ``LayerNorm(out + residual)`` (HF's BertSelfOutput / BertOutput)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.dense = nn.Linear(in_dim, out_dim)
        self.LayerNorm = nn.LayerNorm(out_dim, eps=1e-12)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.self = BertSelfAttention(hidden, heads)  # official name "self"
        self.output = BertDenseLayerNorm(hidden, hidden)

    def forward(self, x: torch.Tensor, extended_mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, extended_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.dense = nn.Linear(hidden, ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, BERT's "gelu"


class BertLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int):
        super().__init__()
        self.attention = BertAttention(hidden, heads)
        self.intermediate = BertIntermediate(hidden, ffn)
        self.output = BertDenseLayerNorm(ffn, hidden)

    def forward(self, x: torch.Tensor, extended_mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, extended_mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: MagNetConfig):
        super().__init__()
        self.layer = nn.ModuleList(  # official name "layer"
            BertLayer(config.hidden_size, config.lang_heads, config.lang_ffn)
            for _ in range(config.lang_stage_ends[-1])
        )


# --------------------------------------------------------------------------------------------- language-side fusion


class WordPixelAttention(nn.Module):
    """Words attend over pixels (the official language-side ``SpatialImageLanguageAttention``).

    query = Conv1d(words) * mask; key/value = InstanceNorm1d(Conv1d(pixels)) normalised over pixels; one head;
    scale ``key_dim^-0.5``; ``+ (1e4 * mask - 1e4)``; softmax over pixels; out = InstanceNorm1d(Conv1d(.))
    normalised over the T word positions. Affine-free InstanceNorms (eps 1e-5) have no parameters.
    """

    def __init__(self, vis_dim: int, lang_dim: int, num_heads: int = 1):
        super().__init__()
        self.num_heads, self.key_dim = num_heads, lang_dim
        self.f_query = nn.Sequential(nn.Conv1d(lang_dim, lang_dim, kernel_size=1))
        self.f_key = nn.Sequential(nn.Conv1d(vis_dim, lang_dim, kernel_size=1), nn.InstanceNorm1d(lang_dim))
        self.f_value = nn.Sequential(nn.Conv1d(vis_dim, lang_dim, kernel_size=1), nn.InstanceNorm1d(lang_dim))
        self.W = nn.Sequential(nn.Conv1d(lang_dim, lang_dim, kernel_size=1), nn.InstanceNorm1d(lang_dim))

    def forward(self, pixels: torch.Tensor, words: torch.Tensor, extended_mask: torch.Tensor) -> torch.Tensor:
        """pixels (B, HW, Cv); words (B, T, C); extended_mask (B, 1, 1, T). Returns (B, T, C)."""
        b, hw = pixels.shape[:2]
        t, heads, d = words.shape[1], self.num_heads, self.key_dim // self.num_heads
        # QUIRK 1: ``mask`` here is the additive extended mask (0 valid / -10000 pad), not the binary mask:
        # valid queries become 0 (uniform attention over pixels), pad queries are scaled by -10000.
        mask = extended_mask.squeeze(1)  # (B, 1, T)
        query = (self.f_query(words.transpose(1, 2)) * mask).transpose(1, 2)
        query = query.reshape(b, t, heads, d).permute(0, 2, 1, 3)
        key = self.f_key(pixels.transpose(1, 2)).reshape(b, heads, d, hw)
        value = self.f_value(pixels.transpose(1, 2)).reshape(b, heads, d, hw)
        sim = (self.key_dim ** -0.5) * (query @ key)
        sim = sim + (1e4 * mask.unsqueeze(-1) - 1e4)  # QUIRK 1 again: -1e4 (valid) or -1e8-1e4 (pad) per row
        out = sim.softmax(dim=-1) @ value.permute(0, 1, 3, 2)
        out = out.permute(0, 2, 1, 3).reshape(b, t, self.key_dim)
        return self.W(out.transpose(1, 2)).transpose(1, 2)


class LanguagePWAM(nn.Module):
    """Language-side fusion: GELU(Linear(words)) * attended pixels -> GELU(Conv1d). Always runs in float32:
    the -1e4-scaled queries and -1e8 offsets need float32 range and spacing (bf16/fp16 break the argmax)."""

    def __init__(self, vis_dim: int, lang_dim: int, num_heads: int = 1):
        super().__init__()
        self.vis_project = nn.Sequential(nn.Linear(lang_dim, lang_dim), nn.GELU())  # official name; reads words
        self.image_lang_att = WordPixelAttention(vis_dim, lang_dim, num_heads)
        self.project_mm = nn.Sequential(nn.Conv1d(lang_dim, lang_dim, 1), nn.GELU())

    def forward(self, pixels: torch.Tensor, words: torch.Tensor, extended_mask: torch.Tensor) -> torch.Tensor:
        with _autocast_off(pixels.device):
            pixels, words, extended_mask = pixels.float(), words.float(), extended_mask.float()
            words_proj = self.vis_project(words)
            attended = self.image_lang_att(pixels, words, extended_mask)
            mixed = words_proj.transpose(1, 2) * attended.transpose(1, 2)
            return self.project_mm(mixed).transpose(1, 2)


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=device.type, enabled=False)


class MultiModalBert(nn.Module):
    """BERT-base (no pooler) in four stages with the language-side fusion after each (official ``language_model``)."""

    def __init__(self, config: MagNetConfig):
        super().__init__()
        self.stage_ends = tuple(config.lang_stage_ends)
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        vis_dims = [config.embed_dim * 2 ** i for i in range(len(self.stage_ends))]
        hidden = config.hidden_size
        self.pwams = nn.ModuleList(
            LanguagePWAM(v, hidden, config.fusion_heads[i]) for i, v in enumerate(vis_dims)
        )
        self.res_gates = nn.ModuleList(  # tanh gates with ReLU (the image side uses GELU)
            nn.Sequential(nn.Linear(hidden, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, hidden, bias=False),
                          nn.Tanh())
            for _ in self.stage_ends
        )
        # norms.k(l_residual) is computed by the official forward and thrown away; kept for strict loading
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in self.stage_ends)

    @staticmethod
    def extended_mask(attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) 0/1 -> (B, 1, 1, T) additive float32 mask: 0 on words, -10000 on pads."""
        return (1.0 - attention_mask[:, None, None, :].float()) * EXTENDED_MASK_VALUE

    def forward_stage(self, stage: int, words: torch.Tensor, extended_mask: torch.Tensor) -> torch.Tensor:
        start = 0 if stage == 0 else self.stage_ends[stage - 1]
        for layer in self.encoder.layer[start:self.stage_ends[stage]]:
            words = layer(words, extended_mask)
        return words

    def forward_fusion(self, stage: int, pixels: torch.Tensor, words: torch.Tensor,
                       extended_mask: torch.Tensor) -> torch.Tensor:
        """words + tanh-gate(residual) * residual, residual = language PWAM(stage-k pixels, words)."""
        residual = self.pwams[stage](pixels, words, extended_mask)
        return words + self.res_gates[stage](residual) * residual


# --------------------------------------------------------------------------------------------- Mask2Former decoder


class SelfAttentionLayer(nn.Module):
    """Post-norm query self-attention; q = k = tgt + query_pos."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        q = k = tgt + query_pos
        return self.norm(tgt + self.self_attn(q, k, value=tgt)[0])


class CrossAttentionLayer(nn.Module):
    """Post-norm masked cross-attention from queries to one feature level (Mask2Former Eq. 2)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(dim, heads)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor, pos: torch.Tensor,
                query_pos: torch.Tensor) -> torch.Tensor:
        attended = self.multihead_attn(query=tgt + query_pos, key=memory + pos, value=memory,
                                       attn_mask=memory_mask)[0]
        return self.norm(tgt + attended)


class FFNLayer(nn.Module):
    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        return self.norm(tgt + self.linear2(F.relu(self.linear1(tgt))))


class MLP(nn.Module):
    """Linear layers with ReLU between them (Mask2Former's mask embedding head)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskedAttentionDecoder(nn.Module):
    """Mask2Former's ``MultiScaleMaskedTransformerDecoder``: cross-attention (masked by the previous prediction)
    -> self-attention -> FFN per layer, cycling the 1/32, 1/16, 1/8 levels. No language input."""

    num_levels = 3

    def __init__(self, config: MagNetConfig):
        super().__init__()
        dim, heads = config.decoder_dim, config.decoder_heads
        self.heads = heads
        self.pe_layer = PositionEmbeddingSine(dim // 2)
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(dim, heads) for _ in range(config.decoder_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(dim, heads) for _ in range(config.decoder_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(dim, config.decoder_ffn) for _ in range(config.decoder_layers))
        self.decoder_norm = nn.LayerNorm(dim)
        self.query_feat = nn.Embedding(config.num_queries, dim)
        self.query_embed = nn.Embedding(config.num_queries, dim)
        self.level_embed = nn.Embedding(self.num_levels, dim)
        # input_proj is an identity (features are already decoder_dim wide): no parameters in the checkpoint
        self.class_embed = nn.Linear(dim, config.num_classes + 1)  # computed, but has no effect on the mask
        self.mask_embed = MLP(dim, dim, config.mask_dim, 3)

    def prediction_heads(self, output: torch.Tensor, mask_features: torch.Tensor, target_size: tuple[int, int]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        decoded = self.decoder_norm(output).transpose(0, 1)  # (B, Q, C)
        class_logits = self.class_embed(decoded)
        mask_logits = torch.einsum("bqc,bchw->bqhw", self.mask_embed(decoded), mask_features)
        resized = F.interpolate(mask_logits, size=target_size, mode="bilinear", align_corners=False)
        attn_mask = resized.sigmoid().flatten(2).unsqueeze(1).repeat(1, self.heads, 1, 1).flatten(0, 1) < 0.5
        return class_logits, mask_logits, attn_mask.detach()

    def forward(self, features: list[torch.Tensor], mask_features: torch.Tensor) -> dict[str, torch.Tensor]:
        """features: the three lowest-resolution pixel-decoder maps (1/32, 1/16, 1/8); mask_features at 1/4."""
        sizes = [tuple(f.shape[-2:]) for f in features]
        pos = [self.pe_layer(f).flatten(2).permute(2, 0, 1) for f in features]
        src = [(f.flatten(2) + self.level_embed.weight[i][None, :, None]).permute(2, 0, 1)
               for i, f in enumerate(features)]
        batch = src[0].shape[1]
        query_pos = self.query_embed.weight.unsqueeze(1).repeat(1, batch, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, batch, 1)
        class_logits, mask_logits, attn_mask = self.prediction_heads(output, mask_features, sizes[0])
        for i in range(len(self.transformer_cross_attention_layers)):
            level = i % self.num_levels
            attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False  # fully masked -> unmasked
            output = self.transformer_cross_attention_layers[i](output, src[level], attn_mask, pos[level], query_pos)
            output = self.transformer_self_attention_layers[i](output, query_pos)
            output = self.transformer_ffn_layers[i](output)
            class_logits, mask_logits, attn_mask = self.prediction_heads(
                output, mask_features, sizes[(i + 1) % self.num_levels])
        return {"pred_logits": class_logits, "pred_masks": mask_logits}


class MaskFormerHead(nn.Module):
    """Pixel decoder + transformer decoder (official ``classifier``)."""

    def __init__(self, config: MagNetConfig):
        super().__init__()
        in_channels = tuple(config.embed_dim * 2 ** i for i in range(len(config.depths)))
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            in_channels, config.decoder_dim, config.mask_dim, config.decoder_heads, config.pixel_decoder_layers,
            config.pixel_decoder_ffn, config.group_norm_groups)
        self.predictor = MaskedAttentionDecoder(config)

    def forward(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        mask_features, multi_scale = self.pixel_decoder(features)
        return self.predictor(multi_scale, mask_features)


# --------------------------------------------------------------------------------------------- full model


class MagNet(nn.Module):
    """The official inference ``WrapperModel``: image and language encoders in lockstep, then Mask2Former."""

    def __init__(self, config: MagNetConfig | None = None):
        super().__init__()
        self.config = config or MagNetConfig()
        c = self.config
        if len(c.lang_stage_ends) != len(c.depths):
            raise ValueError("need one language stage per image stage")
        self.image_model = MultiModalSwin(c.embed_dim, c.depths, c.num_heads, c.window_size, c.mlp_ratio,
                                          c.hidden_size, c.fusion_heads)
        self.language_model = MultiModalBert(c)
        self.classifier = MaskFormerHead(c)
        self.lang_proj = nn.Linear(c.hidden_size, c.decoder_dim)  # in the checkpoints; unused at inference

    def fuse(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
             ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The backbone with both fusions: the four image stages' mixer outputs (s1..s4) and the final words."""
        batch = input_ids.shape[0]
        if pixel_values.shape[0] not in (1, batch):
            raise ValueError(f"{pixel_values.shape[0]} images for {batch} expressions")
        x, height, width = self.image_model.forward_stem(pixel_values)
        if x.shape[0] != batch:
            x = x.expand(batch, -1, -1)
        word_mask = attention_mask.unsqueeze(-1)  # binary (B, T, 1): image side
        extended_mask = self.language_model.extended_mask(attention_mask)  # QUIRK 1: language side
        words = self.language_model.embeddings(input_ids)
        features = []
        for stage, image_stage in enumerate(self.image_model.layers):
            x = image_stage.forward_blocks(x, height, width)
            words = self.language_model.forward_stage(stage, words, extended_mask)
            s_k, x_next, next_h, next_w = image_stage.forward_fusion(x, height, width, words, word_mask)
            # the language side reads the stage-k tokens before the image gate / patch merging
            words = self.language_model.forward_fusion(stage, x, words, extended_mask)
            features.append(s_k)
            x, height, width = x_next, next_h, next_w
        return features, words

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                return_features: bool = False) -> dict[str, Any]:
        """pixel_values (1 or B, 3, S, S) normalised; input_ids / attention_mask (B, T), T = 20 as in the release.

        A single image with B expressions is embedded once (the patch stem is language-free) and broadcast; every
        later stage mixes in the words, so it runs per expression. Returns ``pred_logits`` (B, Q, classes + 1) and
        ``pred_masks`` (B, Q, S/4, S/4) logits, plus ``features`` (s1..s4) and ``language`` with
        ``return_features``.
        """
        features, words = self.fuse(pixel_values, input_ids, attention_mask)
        outputs: dict[str, Any] = dict(self.classifier(features))
        if return_features:
            outputs["features"] = features
            outputs["language"] = words
        return outputs


def mask_probabilities(pred_logits: torch.Tensor, pred_masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The official ``evaluate`` post-processing up to the threshold: (B, 1, H, W) foreground probabilities.

    QUIRK 3: logits are upsampled to ``size`` with bilinear ``align_corners=True`` before the sigmoid.
    QUIRK 2: ``softmax(pred_logits, dim=1)`` runs over the query axis (size 1), so the class weight is exactly 1;
    it is computed here as in the release rather than assumed. Threshold the result at 0.5 for the mask.
    """
    upsampled = F.interpolate(pred_masks.float(), size=size, mode="bilinear", align_corners=True)
    class_weight = F.softmax(pred_logits.float(), dim=1)[..., 1:]
    return torch.einsum("bqc,bqhw->bchw", class_weight, upsampled.sigmoid())


# --------------------------------------------------------------------------------------------- checkpoints


def checkpoint_filter_fn(checkpoint: Any) -> dict[str, torch.Tensor]:
    """Official file -> this model's state dict (mechanical only).

    The released files are ``{'model': state_dict}`` with the exact ``WrapperModel`` names. Accepted as well: a
    bare state dict, a DataParallel ``module.`` prefix, and a ``language_model.embeddings.position_ids`` buffer
    (saved by transformers 4.x BERT; positions are recomputed here).
    """
    state_dict = strip_prefix(find_state_dict(checkpoint, ("model", "state_dict")), "module.")
    state_dict.pop("language_model.embeddings.position_ids", None)
    return state_dict


def image_size_for_checkpoint(path: str | Path, checkpoint: Any = None) -> int:
    """Input size the checkpoint was evaluated at: ``args.img_size`` if stored, else 448 for ``magnet_all``
    (run_test.sh) and 480 for the refcoco/refcoco+/refcocog files."""
    args = checkpoint.get("args") if isinstance(checkpoint, Mapping) else None
    if args is not None and getattr(args, "img_size", None):
        return int(args.img_size)
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("img_size"), int):
        return int(checkpoint["img_size"])
    return 448 if "magnet_all" in Path(path).name else 480


def load_magnet_checkpoint(path: str | Path, config: MagNetConfig | None = None) -> MagNet:
    """Build MagNet and load an official ``magnet_*.pth`` strictly (``torch.load(weights_only=True)``).

    The released files hold only ``OrderedDict`` and tensors, which the safe unpickler allows by default.
    Raises ``models.checkpoint.CheckpointMismatchError`` listing every missing / unexpected / mis-shaped entry.
    """
    path = Path(path)
    checkpoint = load_checkpoint_file(path)
    state_dict = checkpoint_filter_fn(checkpoint)
    if config is None and isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("config"), Mapping):
        config = MagNetConfig.from_dict(checkpoint["config"])  # files of training.train (not official)
    if config is None:
        config = MagNetConfig(img_size=image_size_for_checkpoint(path, checkpoint))
    model = MagNet(config)
    table = state_dict.get("image_model.layers.0.blocks.0.attn.relative_position_bias_table")
    source = path.name
    if table is not None and table.shape[0] != (2 * config.window_size - 1) ** 2:
        window = (int(math.isqrt(table.shape[0])) + 1) // 2
        source += f" (its Swin window is {window}, the model's {config.window_size})"
    load_state_dict_strict(model, state_dict, source=source)
    return model.eval()


# --------------------------------------------------------------------------------------------- preprocessing


def preprocess_image(image: Image.Image, size: int) -> torch.Tensor:
    """Official test transform: RGB, PIL bilinear resize to size x size (aspect ratio not kept), to_tensor,
    ImageNet mean/std. Returns (3, size, size) float32."""
    resized = image.convert("RGB").resize((size, size), Image.BILINEAR)
    tensor = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    return (tensor - mean) / std


def tokenize_expressions(texts: Sequence[str], tokenizer: Any = None, max_tokens: int = MAX_TOKENS
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Official ReferDataset text path: encode with [CLS]/[SEP], keep the first ``max_tokens`` ids ([SEP] is lost
    past 18 wordpieces), right-pad with id 0 to exactly ``max_tokens``. Returns int64 ids and 0/1 mask (N, T)."""
    if tokenizer is None:
        from models.tokenizers import bert_tokenizer

        tokenizer = bert_tokenizer()
    ids = torch.zeros((len(texts), max_tokens), dtype=torch.long)
    mask = torch.zeros((len(texts), max_tokens), dtype=torch.long)
    for row, text in enumerate(texts):
        encoded = tokenizer.encode(text, add_special_tokens=True)[:max_tokens]
        ids[row, : len(encoded)] = torch.tensor(encoded, dtype=torch.long)
        mask[row, : len(encoded)] = 1
    return ids, mask


def rasterize_refer_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """REFER.getMask: decode COCO polygons (or RLE) and SUM the parts -> uint8 count per pixel (H, W)."""
    from pycocotools import mask as coco_mask

    if isinstance(segmentation, list) and segmentation and isinstance(segmentation[0], list):
        rle = coco_mask.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    decoded = coco_mask.decode(rle)
    if decoded.ndim == 3:
        decoded = decoded.sum(axis=2)
    return decoded.astype(np.uint8)


def reference_target(part_counts: np.ndarray, size: int) -> np.ndarray:
    """Official evaluation target: pixels whose part count is exactly 1 (pixels covered by two polygon parts
    become background - a LAVT quirk), NEAREST-resized to size x size. Returns int64 (size, size) of 0/1."""
    annot = (np.asarray(part_counts) == 1).astype(np.uint8)
    resized = Image.fromarray(annot).resize((size, size), Image.NEAREST)
    return np.asarray(resized).astype(np.int64)


# --------------------------------------------------------------------------------------------- service surface


PRECISIONS = ("fp32", "bf16", "fp16", "official")
MASK_THRESHOLD = 0.5  # official decision: sigmoid(upsampled logits) > 0.5


@dataclass
class MagNetSegmenter:
    """What the ``/segment`` route calls: image + expressions -> foreground probability maps at original size.

    Each expression is run as its own sample (language fuses into every backbone stage, so image features cannot
    be shared beyond the patch stem); expressions of one request are batched, ``max_batch`` at a time.
    """

    model: MagNet
    device: torch.device
    precision: str = "fp32"
    version: str = "magnet-untrained"
    max_batch: int = 4
    tokenizer: Any = field(default=None, repr=False)
    method: str = "magnet"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        self.model = self.model.to(self.device).eval()

    @property
    def img_size(self) -> int:
        return self.model.config.img_size

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", precision: str = "fp32",
                        config: MagNetConfig | None = None) -> MagNetSegmenter:
        path = Path(path)
        model = load_magnet_checkpoint(path, config)
        version = f"magnet-{_slug(path.stem)}-{file_version(path)}"
        return cls(model=model, device=torch.device(device), precision=precision, version=version)

    @classmethod
    def from_config(cls, config: MagNetConfig | Mapping[str, Any] | None = None, device: str | torch.device = "cpu",
                    precision: str = "fp32", state_dict: Mapping[str, torch.Tensor] | None = None,
                    version: str | None = None) -> MagNetSegmenter:
        """Build from a config (randomly initialised unless ``state_dict`` is given, loaded strictly)."""
        if config is None or isinstance(config, MagNetConfig):
            cfg = config or MagNetConfig()
        else:
            cfg = MagNetConfig.from_dict(config)
        model = MagNet(cfg)
        if state_dict is not None:
            load_state_dict_strict(model, checkpoint_filter_fn(dict(state_dict)), source="(given state dict)")
        return cls(model=model, device=torch.device(device), precision=precision,
                   version=version or ("magnet-state-dict" if state_dict is not None else "magnet-untrained"))

    def autocast_context(self) -> contextlib.AbstractContextManager:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @torch.inference_mode()
    def segment(self, image: Image.Image, expressions: Sequence[str]) -> list[np.ndarray]:
        """Foreground probability maps (H0, W0) float32 for each expression, H0 x W0 the original image size.

        The model sees the official input (square resize to ``img_size``). Its stride-4 mask logits are upsampled
        ONCE, bilinearly with ``align_corners=True`` (the official kernel), straight to (H0, W0) - not to S x S
        first - and passed through the sigmoid; ``map > 0.5`` is the official mask decision, which at H0 = W0 = S
        is exactly the official output.
        """
        if not expressions:
            return []
        if self.tokenizer is None:
            from models.tokenizers import bert_tokenizer

            self.tokenizer = bert_tokenizer()
        original_w, original_h = image.size
        pixels = preprocess_image(image, self.img_size).unsqueeze(0).to(self.device)
        ids, mask = tokenize_expressions(expressions, self.tokenizer, self.model.config.max_tokens)
        maps: list[np.ndarray] = []
        for start in range(0, len(expressions), self.max_batch):
            chunk_ids = ids[start:start + self.max_batch].to(self.device)
            chunk_mask = mask[start:start + self.max_batch].to(self.device)
            with self.autocast_context():
                out = self.model(pixels, chunk_ids, chunk_mask)
            probs = mask_probabilities(out["pred_logits"], out["pred_masks"], (original_h, original_w))
            maps.extend(p[0].float().cpu().numpy().astype(np.float32) for p in probs)
        return maps


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "checkpoint"
