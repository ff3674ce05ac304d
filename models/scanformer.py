"""ScanFormer (Su et al., CVPR 2024, arXiv 2406.18048): referring expression comprehension by iterative scanning.

No official code or weights exist; this is rebuilt from the paper (seed 003, research/scanformer.md) on top of
ViLT-B/32 (:mod:`models.vilt`), whose checkpoint initialises every shared parameter (:meth:`ScanFormer.
init_from_vilt`). Parameter names of the shared parts are ViLT's; ScanFormer's own parts are
``position_scale_embed.*``, ``reg_scale_embed``, ``const_token``, ``select_head.*`` and ``box_head.*``.

The scan (paper Sec. 3.1, Fig. 2/3):
1. the expression (BERT tokens, at most 40) goes through all layers once; its keys/values enter every layer's
   cache. Text is a prefix: it never attends to image tokens (it shares the coarsest scale's pass, masked);
2. an image pyramid of ``num_scales`` square images (factor 2 apart) is scanned coarse to fine. At scale l the
   new tokens are a per-scale [REG] token plus the scale's patches: every patch at the coarsest scale, and at a
   finer scale the 2x2 children of the patches selected one scale up (a patch whose parent was dropped is
   dropped too). New tokens are the queries; keys/values are the cache + the new tokens (bidirectional within
   a scale, causal across scales), so nothing computed before is recomputed;
3. the outputs of the first ``split_layer`` layers (Encoder1, "the first half") of each patch give its
   selection logit r_i, which decides whether its 2x2 children are fed at the next scale;
4. the [REG] output after the remaining layers (Encoder2) and ``transformer.norm`` goes through a box MLP
   shared by all scales and a sigmoid: a normalised (cx, cy, w, h) on the square canvas, one box per scale.
   The last scale's box is the answer.

Patch selection by constant replacement (paper eq. 1-3): r^n = r + n with n ~ N(0, 1) in training, n = 0 in
eval; v1 = clamp(1.2 sigmoid(r^n) - 0.1, 0, 1), v2 = 1[r^n >= 0]; in training s = v1 or v2 by a uniform draw,
the gradient always through v1 (straight-through); the token is s E_i + (1 - s) E_const. In eval s = v2.
Merging (eq. 4-6): the Nc constant tokens of a scale are identical, so they are computed as ONE token whose
key gets +log(Nc) on its attention logit - the same attention output, exactly; dropped patches are never
embedded or computed.

Losses (eq. 7-9): per-scale L1 + GIoU with per-scale weights, plus
lambda_sparse * sum_{l >= 1} (mean_i s_i^l - beta^l)^2.

Every value the paper leaves open is a :class:`ScanFormerConfig` field; its docstring says which are choices.
Structural choices of ours (the paper text that could be read does not settle them):
- pyramid: each coarser image is the 2x2 mean of the next finer one; a scale-l patch covers exactly 2x2
  patches of scale l+1 (one selection logit per parent, shared by its four children);
- hierarchy: a child is fed only if its parent was fed AND selected (s_child = s_parent * s_select), so a
  dropped region stays dropped; the sparsity loss uses these effective factors;
- [REG] at scale l = ViLT's image class token (``cls_token + pos_embed[:, 0]``) + a learned per-scale vector;
  earlier [REG] tokens stay in the cache;
- PSE = ViLT's pretrained position grid sampled at the patch centre + an MLP of the scale (see
  :class:`PositionScaleEmbedding`); the constant token replaces patch + PSE, so all constants are identical
  (needed for exact merging);
- the text is a prefix that never attends to the image (the paper encodes it first and caches it).
"""

from __future__ import annotations

import json
import math
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from models.checkpoint import file_version, load_checkpoint_file, load_state_dict_strict
from models.vilt import BertEmbeddings, KVCache, ViltConfig, VisionTransformer, checkpoint_filter_fn

__all__ = [
    "ScanFormerConfig",
    "ScanFormer",
    "ScanOutput",
    "ScanStep",
    "InitReport",
    "PositionScaleEmbedding",
    "SelectHead",
    "BoxHead",
    "scanformer_losses",
    "box_cxcywh_to_xyxy",
    "generalized_box_iou",
    "save_scanformer_checkpoint",
    "load_scanformer_checkpoint",
    "ScanFormerGrounder",
    "preprocess_image",
    "tokenize_expressions",
]

CHECKPOINT_FORMAT = "scanformer-v1"


@dataclass
class ScanFormerConfig:
    """Every ScanFormer setting, with its default and where it comes from.

    From the paper: a shared ViLT encoder split into halves; per-scale [REG]; shared box MLP + sigmoid;
    selection noise N(0, 1), v1 = clamp(1.2 sigmoid - 0.1), v2 = 1[r >= 0], uniform v1/v2 draw (p = 0.5);
    3 scales (the box loss sums l = 0..2, the sparsity loss l = 1..2). Everything else is OUR choice where
    the paper (as far as it could be read) is silent; each is marked [choice].
    """

    vilt: ViltConfig = field(default_factory=ViltConfig)
    num_scales: int = 3  # paper eq. 7 sums l = 0..2
    image_size: int = 512  # [choice] finest square canvas; pyramid 128/256/512 -> 4x4, 8x8, 16x16 patches
    split_layer: int = -1  # layers [0, split) = Encoder1; -1 = num_layers // 2 ("the first half")
    # selection (paper eq. 1-2)
    select_threshold: float = 0.0  # v2 = 1[r >= threshold]; the paper's threshold is 0
    select_noise_std: float = 1.0  # n ~ N(0, 1) added to r in training only
    select_soft_probability: float = 0.5  # P(s = v1) in training; the paper draws n_s ~ U[0, 1], v1 if >= 0.5
    select_draw: str = "token"  # [choice] one v1/v2 draw per "token" or per "sample"
    select_hidden: int = 0  # [choice] select head: LN -> Linear(D, hidden) -> GELU -> Linear(hidden, 1); 0 = D
    select_bias_init: float = 0.0  # [choice] initial bias of the selection logit
    # box head (shared across scales; VG-LAW's MLP(D, 256, 4, 3 layers) by the same first author)
    box_head_hidden: int = 256  # [choice]
    box_head_layers: int = 3  # [choice]
    # losses (paper eq. 7-9); weights and targets are [choice]
    l1_weights: tuple[float, ...] = (1.0, 1.0, 1.0)  # lambda_L1^l per scale, coarse to fine
    giou_weights: tuple[float, ...] = (1.0, 1.0, 1.0)  # lambda_giou^l per scale
    sparse_weight: float = 1.0  # lambda_sparse
    sparse_targets: tuple[float, ...] = (0.5, 0.25)  # beta^l for scales 1..S-1 (fraction of each grid kept)
    # inference
    merge_constant_tokens: bool = True  # eval: Nc constant tokens -> 1 token with +log(Nc) (exact)
    # preprocessing (see preprocess_image) [choice]: ViLT's normalisation, since the weights are ViLT's
    pixel_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pixel_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if isinstance(self.vilt, dict):
            self.vilt = ViltConfig(**self.vilt)
        for name in ("l1_weights", "giou_weights", "sparse_targets", "pixel_mean", "pixel_std"):
            setattr(self, name, tuple(float(v) for v in getattr(self, name)))
        if self.num_scales < 1:
            raise ValueError("num_scales must be >= 1")
        smallest = self.image_size // 2 ** (self.num_scales - 1)
        if smallest * 2 ** (self.num_scales - 1) != self.image_size or smallest % self.vilt.patch_size:
            raise ValueError(
                f"image_size {self.image_size} must be patch_size ({self.vilt.patch_size}) x 2^(num_scales-1)"
                f" x an integer"
            )
        if len(self.l1_weights) != self.num_scales or len(self.giou_weights) != self.num_scales:
            raise ValueError("l1_weights and giou_weights need one value per scale")
        if len(self.sparse_targets) != self.num_scales - 1:
            raise ValueError("sparse_targets needs one value per scale after the first")
        if self.select_draw not in ("token", "sample"):
            raise ValueError("select_draw is 'token' or 'sample'")
        if not 0 < self.encoder1_layers < self.vilt.num_layers:
            raise ValueError("split_layer must leave at least one layer on each side")

    @property
    def encoder1_layers(self) -> int:
        return self.vilt.num_layers // 2 if self.split_layer < 0 else self.split_layer

    @property
    def scale_sizes(self) -> list[int]:
        """Square image side per scale, coarse to fine."""
        return [self.image_size // 2 ** (self.num_scales - 1 - s) for s in range(self.num_scales)]

    @property
    def grid_sizes(self) -> list[int]:
        """Patches per side per scale, coarse to fine."""
        return [size // self.vilt.patch_size for size in self.scale_sizes]

    @classmethod
    def small(cls, **overrides: Any) -> ScanFormerConfig:
        """Tiny model for tests and demos: D=64, 4 layers, 16x16 patches, pyramid 32/64/128 (2x2, 4x4, 8x8)."""
        values: dict[str, Any] = dict(vilt=ViltConfig.small(patch_size=16), image_size=128)
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain python values only (lists, not tuples), so a checkpoint loads with ``weights_only=True``."""
        out = asdict(self)
        return json.loads(json.dumps(out))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ScanFormerConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown ScanFormerConfig fields: {sorted(unknown)}")
        values = dict(values)
        if isinstance(values.get("vilt"), dict):
            values["vilt"] = ViltConfig(**values["vilt"])
        return cls(**values)


# --------------------------------------------------------------------------------------------- modules


class PositionScaleEmbedding(nn.Module):
    """PSE: [0, 1]^3 -> R^D from a patch's normalised centre (cx, cy) and scale s (paper Sec. 3.1).

    [choice] spatial part = ViLT's pretrained 12x12 ``pos_embed`` grid sampled bilinearly at (cx, cy), grid
    node j sitting at (j + 0.5) / 12 (``grid_sample``, align_corners=False, border padding), so a parent and
    its children get consistent positions at every scale; scale part = a small MLP of s.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale_fc1 = nn.Linear(1, dim)
        self.act = nn.GELU()
        self.scale_fc2 = nn.Linear(dim, dim)

    def forward(self, pos_table: torch.Tensor, centers: torch.Tensor, scale: float) -> torch.Tensor:
        """pos_table [1, G*G, D] (row-major grid), centers [N, 2] as (cx, cy) in [0, 1] -> [N, D]."""
        grid = int(round(pos_table.shape[1] ** 0.5))
        table = pos_table.transpose(1, 2).reshape(1, pos_table.shape[2], grid, grid)
        sample_at = (centers * 2 - 1).to(table.dtype).view(1, -1, 1, 2)
        spatial = F.grid_sample(table, sample_at, mode="bilinear", padding_mode="border", align_corners=False)
        spatial = spatial[0, :, :, 0].transpose(0, 1)
        scale_in = torch.full((1, 1), float(scale), dtype=table.dtype, device=table.device)
        return spatial + self.scale_fc2(self.act(self.scale_fc1(scale_in)))


class SelectHead(nn.Module):
    """Selection logit r_i of a patch from its Encoder1 output (paper eq. 1); [choice] LN-MLP."""

    def __init__(self, dim: int, hidden: int, bias_init: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, 1)
        nn.init.constant_(self.fc2.bias, bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))[..., 0]


class BoxHead(nn.Module):
    """Shared box MLP (ReLU between layers) + sigmoid -> normalised (cx, cy, w, h) (paper Sec. 3.3)."""

    def __init__(self, dim: int, hidden: int, num_layers: int) -> None:
        super().__init__()
        sizes = [dim] + [hidden] * (num_layers - 1) + [4]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x.sigmoid()


# --------------------------------------------------------------------------------------------- outputs


class ScanStep(NamedTuple):
    """Shape of one cached step: ``queries`` new tokens attended over ``keys`` cached + new keys."""

    name: str
    queries: int
    keys: int


@dataclass
class ScanOutput:
    """What one scan produced (B = batch, S = scales, G_l = grid_l^2)."""

    boxes: torch.Tensor  # [B, S, 4] normalised (cx, cy, w, h) on the square canvas, coarse to fine
    reg_feats: torch.Tensor  # [B, S, D] [REG] features after transformer.norm
    selection: list[torch.Tensor]  # per scale [B, G_l]: s_i (1 = patch, 0 = constant); scale 0 all ones
    select_logits: list[torch.Tensor]  # per scale but the last [B, G_l]: r_i (-inf where not computed)
    kept: list[torch.Tensor]  # per scale [B, G_l] bool: patch tokens actually fed (s_i > 0)
    steps: list[ScanStep]  # token counts of every step, for FLOP counting
    patch_feats: list[torch.Tensor] | None = None  # per scale [B, G_l, D] final hidden state (return_tokens)
    select_scores: list[torch.Tensor] = field(default_factory=list)  # r_i as select_logits, with gradient

    @property
    def kept_counts(self) -> torch.Tensor:
        return torch.stack([k.sum(dim=1) for k in self.kept], dim=1)


class InitReport(NamedTuple):
    missing: list[str]  # model entries the ViLT checkpoint did not fill (ScanFormer's own)
    unexpected: list[str]  # checkpoint entries the model does not use (pooler, pre-training heads)


# --------------------------------------------------------------------------------------------- model


def _patch_centers(grid: int, device: torch.device) -> torch.Tensor:
    """Normalised (cx, cy) of a grid x grid raster of patches -> [grid*grid, 2]."""
    coords = (torch.arange(grid, device=device, dtype=torch.float32) + 0.5) / grid
    cy, cx = torch.meshgrid(coords, coords, indexing="ij")
    return torch.stack([cx.flatten(), cy.flatten()], dim=1)


def _cut_patches(image: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, (H/P)*(W/P), 3*P*P], raster order, each patch flattened (channel, row, column)."""
    batch, channels, height, width = image.shape
    gh, gw = height // patch, width // patch
    x = image.reshape(batch, channels, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(batch, gh * gw, channels * patch * patch)


def _to_children(parent: torch.Tensor, grid: int) -> torch.Tensor:
    """Per-patch values [B, grid^2] -> the value of each 2x2 child on the next grid [B, (2 grid)^2]."""
    x = parent.view(parent.shape[0], grid, grid)
    x = x.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    return x.flatten(1)


class ScanFormer(nn.Module):
    """ViLT-B/32 encoder + ScanFormer's position-scale embedding, [REG] tokens, constant token and heads."""

    def __init__(self, cfg: ScanFormerConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or ScanFormerConfig()
        vcfg = self.cfg.vilt
        dim = vcfg.hidden_size
        # ViLT parts, with ViLT's names (no pooler: ScanFormer never uses the text-[CLS] pooler)
        self.text_embeddings = BertEmbeddings(vcfg)
        self.token_type_embeddings = nn.Embedding(2, dim)  # modality: 0 = text, 1 = image
        self.transformer = VisionTransformer(vcfg)
        # ScanFormer's own parts
        self.position_scale_embed = PositionScaleEmbedding(dim)
        # [REG] at scale l = ViLT image class token (cls_token + pos_embed[:, 0]) + reg_scale_embed[l]
        self.reg_scale_embed = nn.Parameter(torch.zeros(self.cfg.num_scales, dim))
        self.const_token = nn.Parameter(torch.zeros(dim))  # E^const
        nn.init.trunc_normal_(self.const_token, std=0.02)
        self.select_head = SelectHead(dim, self.cfg.select_hidden or dim, self.cfg.select_bias_init)
        self.box_head = BoxHead(dim, self.cfg.box_head_hidden, self.cfg.box_head_layers)
        for module in (self.position_scale_embed, self.select_head, self.box_head):
            module.apply(_init_linear)
        nn.init.constant_(self.select_head.fc2.bias, self.cfg.select_bias_init)

    # ----------------------------------------------------------------------------------- checkpoints

    OWN_PREFIXES = ("position_scale_embed.", "reg_scale_embed", "const_token", "select_head.", "box_head.")

    def own_parameter_names(self) -> list[str]:
        """state_dict entries that are ScanFormer's own (not in a ViLT checkpoint)."""
        return [k for k in self.state_dict() if k.startswith(self.OWN_PREFIXES)]

    def init_from_vilt(self, state_dict: dict[str, Any]) -> InitReport:
        """Fill the shared parts from a ViLT checkpoint (the Lightning dict or its ``state_dict``).

        Returns which model entries stayed unfilled (must be exactly ScanFormer's own) and which file entries
        were not used (``pooler.*``, ``mlm_score.*``, ``itm_score.*``).
        """
        weights = checkpoint_filter_fn(state_dict)
        own = self.state_dict()
        shared = {k: v for k, v in weights.items() if k in own}
        mismatched = [k for k, v in shared.items() if tuple(v.shape) != tuple(own[k].shape)]
        if mismatched:
            raise ValueError(f"ViLT checkpoint shapes do not fit: {mismatched}")
        result = self.load_state_dict(shared, strict=False)
        return InitReport(sorted(result.missing_keys), sorted(k for k in weights if k not in own))

    # ----------------------------------------------------------------------------------- embeddings

    @property
    def num_layers(self) -> int:
        return self.cfg.vilt.num_layers

    def embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """BERT embeddings + modality type 0 (as ViLT)."""
        return self.text_embeddings(text_ids) + self.token_type_embeddings.weight[0]

    def reg_token(self, scale: int, batch: int) -> torch.Tensor:
        """[B, 1, D] input of scale ``scale``'s [REG] token."""
        cls = self.transformer.cls_token[0, 0] + self.transformer.pos_embed[0, 0]
        reg = cls + self.reg_scale_embed[scale] + self.token_type_embeddings.weight[1]
        return reg.view(1, 1, -1).expand(batch, 1, -1)

    def scale_value(self, scale: int) -> float:
        """Normalised scale s in [0, 1]: 0 = coarsest, 1 = finest."""
        return scale / (self.cfg.num_scales - 1) if self.cfg.num_scales > 1 else 1.0

    def patch_embeddings(self, patches: torch.Tensor, positions: torch.Tensor, scale: int) -> torch.Tensor:
        """E_i = linear patch embedding + PSE(cx, cy, s), for cut patches [B, N, 3PP] at grid ``positions``.

        ``positions`` [B, N] index the scale's raster grid.
        """
        grid = self.cfg.grid_sizes[scale]
        centers = _patch_centers(grid, patches.device)
        pse = self.position_scale_embed(self.transformer.pos_embed[:, 1:], centers, self.scale_value(scale))
        return self.transformer.patch_embed.embed_flat_patches(patches) + pse[positions]

    def mix_constant(self, embeddings: torch.Tensor, selection: torch.Tensor) -> torch.Tensor:
        """Paper eq. 3: s_i E_i + (1 - s_i) E^const, then modality type 1."""
        s = selection.unsqueeze(-1).to(embeddings.dtype)
        mixed = s * embeddings + (1 - s) * self.const_token
        return mixed + self.token_type_embeddings.weight[1]

    def constant_input(self) -> torch.Tensor:
        """The input of a replaced patch: E^const + modality type 1 (identical for every replaced patch)."""
        return self.const_token + self.token_type_embeddings.weight[1]

    def build_pyramid(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Finest canvas [B, 3, S, S] -> images coarse to fine; each coarser one is the 2x2 mean of the next."""
        images = [pixel_values]
        for _ in range(self.cfg.num_scales - 1):
            images.append(F.avg_pool2d(images[-1], kernel_size=2))
        return images[::-1]

    # ----------------------------------------------------------------------------------- selection

    def selection_factor(self, logits: torch.Tensor) -> torch.Tensor:
        """Paper eq. 1-2. Training: noisy r, v1 or v2 by a uniform draw, gradient through v1. Eval: v2."""
        cfg = self.cfg
        if not self.training:
            return (logits >= cfg.select_threshold).to(logits.dtype)
        noisy = logits + cfg.select_noise_std * torch.randn_like(logits)
        v1 = (1.2 * torch.sigmoid(noisy) - 0.1).clamp(0.0, 1.0)
        v2 = (noisy >= cfg.select_threshold).to(logits.dtype)
        draw_shape = logits.shape if cfg.select_draw == "token" else (logits.shape[0], 1)
        use_v1 = torch.rand(draw_shape, device=logits.device) < cfg.select_soft_probability
        chosen = torch.where(use_v1, v1, v2)
        return v1 + (chosen - v1).detach()  # straight-through: forward = chosen, gradient = d v1

    @staticmethod
    def _top_fraction(logits: torch.Tensor, parent: torch.Tensor, fraction: float, grid: int) -> torch.Tensor:
        """Hard selection keeping the top round(fraction * next grid / 4) parents by r among kept ones."""
        want = int(round(fraction * (2 * grid) ** 2 / 4))
        scores = logits.masked_fill(parent <= 0, float("-inf"))
        chosen = torch.zeros_like(logits)
        for b in range(logits.shape[0]):
            k = min(want, int((parent[b] > 0).sum()))
            if k > 0:
                chosen[b, scores[b].topk(k).indices] = 1.0
        return chosen

    # ----------------------------------------------------------------------------------- scan

    def _run_layers(
        self,
        x: torch.Tensor,
        new_key_bias: torch.Tensor,
        cache: KVCache,
        layers: range,
        query_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """New tokens through ``layers``: queries = new tokens, keys/values = cache + new (stored back).

        ``new_key_bias`` [B, N_new] is the additive logit bias of each new key; ``query_bias`` [N_new, N_all]
        (optional) adds a per-query part, e.g. the text rows that must not see the first scale.
        """
        bias = cache.attention_bias(new_key_bias)
        if query_bias is not None:
            bias = bias + query_bias
        for index in layers:
            x, present = self.transformer.blocks[index](x, bias, cache.layer(index))
            cache.store(index, *present)
        return x

    @staticmethod
    def trim_text_padding(text_ids: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop the trailing columns that are padding in every row.

        Padding keys are masked (-inf) for every query, so no output depends on padding positions: this is
        exact, and saves computing up to 40 - length text tokens (ViLT computes them).
        """
        length = int(text_mask.sum(dim=1).max()) if text_mask.numel() else 0
        if length == 0 or bool(text_mask[:, length:].any()):
            return text_ids, text_mask
        return text_ids[:, :length], text_mask[:, :length]

    def forward(
        self,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        keep_fractions: Sequence[float] | None = None,
        merge_constant_tokens: bool | None = None,
        return_tokens: bool = False,
        score_every_scale: bool = False,
    ) -> ScanOutput:
        """Scan the pyramid of ``pixel_values`` [B, 3, S, S] (the finest canvas) for ``text_ids`` [B, L].

        The text and the coarsest scale share the first pass (text rows masked from the image columns: the
        same result as encoding the text alone first, with one read of the weights less); every later scale
        is one pass of its new tokens over the cache.

        ``keep_fractions`` (eval only) replaces the learned threshold: at every scale after the first, keep
        the top fraction of that scale's grid by r (used by the benchmark). ``merge_constant_tokens``
        overrides the config in eval; training always feeds every position (static shapes, soft s).
        ``score_every_scale`` also runs the selection head on the last scale (for ``select_scores`` only; no
        later scale uses it).
        """
        cfg = self.cfg
        if self.training and keep_fractions is not None:
            raise ValueError("keep_fractions is an inference-time override")
        merge = cfg.merge_constant_tokens if merge_constant_tokens is None else merge_constant_tokens
        merge = merge and not self.training
        batch = text_ids.shape[0]
        text_ids, text_mask = self.trim_text_padding(text_ids, text_mask)
        text_len = text_ids.shape[1]
        text = self.embed_text(text_ids)
        text_bias = torch.zeros(text_mask.shape, device=text.device)  # key biases stay float32
        text_bias = text_bias.masked_fill(text_mask == 0, float("-inf"))
        cache = KVCache(self.num_layers)
        pyramid = self.build_pyramid(pixel_values)
        split = cfg.encoder1_layers

        steps: list[ScanStep] = []
        selection = torch.ones(batch, cfg.grid_sizes[0] ** 2, device=pixel_values.device)
        selections, logits_out, scores_out, kept_out, boxes, regs, feats = [], [], [], [], [], [], []
        for scale, image in enumerate(pyramid):
            grid = cfg.grid_sizes[scale]
            patches = _cut_patches(image, cfg.vilt.patch_size)
            kept = selection > 0
            if merge:
                tokens, key_bias, slots = self._merged_inputs(patches, selection, scale)
            else:
                positions = torch.arange(grid * grid, device=patches.device).expand(batch, -1)
                tokens = self.mix_constant(self.patch_embeddings(patches, positions, scale), selection)
                key_bias = torch.zeros(batch, tokens.shape[1], device=tokens.device)
                slots = None
            x = torch.cat([self.reg_token(scale, batch).to(tokens.dtype), tokens], dim=1)
            key_bias = torch.cat([key_bias.new_zeros(batch, 1), key_bias], dim=1)
            query_bias, first = None, 0  # ``first`` = index of this scale's [REG] in the pass
            if scale == 0:  # text prefix in the same pass; text queries must not see the image keys
                x = torch.cat([text.to(x.dtype), x], dim=1)
                key_bias = torch.cat([text_bias, key_bias], dim=1)
                query_bias = torch.zeros(x.shape[1], x.shape[1], device=x.device)
                query_bias[:text_len, text_len:] = float("-inf")
                first = text_len
            steps.append(ScanStep("text+scale0" if scale == 0 else f"scale{scale}", x.shape[1],
                                  len(cache) + x.shape[1]))

            x = self._run_layers(x, key_bias, cache, range(0, split), query_bias)  # Encoder1
            if scale < cfg.num_scales - 1:
                logits = self.select_head(x[:, first + 1 :]).float()
                if slots is not None:
                    logits = self._scatter_slots(logits, slots, grid * grid, float("-inf"))
                if keep_fractions is not None:
                    child = self._top_fraction(logits, selection, keep_fractions[scale], grid)
                else:
                    child = self.selection_factor(logits)
                logits_out.append(logits.detach().masked_fill(~kept, float("-inf")))  # r of fed patches only
                scores_out.append(logits)
                next_selection = _to_children(selection * child, grid)
            elif score_every_scale:
                scores = self.select_head(x[:, first + 1 :]).float()
                if slots is not None:
                    scores = self._scatter_slots(scores, slots, grid * grid, float("-inf"))
                scores_out.append(scores)
            x = self._run_layers(x, key_bias, cache, range(split, self.num_layers), query_bias)  # Encoder2
            cache.extend_bias(key_bias)
            x = x[:, first:]

            reg = self.transformer.norm(x[:, 0])
            regs.append(reg)
            boxes.append(self.box_head(reg).float())
            selections.append(selection)
            kept_out.append(kept)
            if return_tokens:
                hidden = x[:, 1:]
                if slots is not None:
                    hidden = self._expand_slots(hidden, slots, grid * grid)
                feats.append(hidden)
            if scale < cfg.num_scales - 1:
                selection = next_selection
        return ScanOutput(
            boxes=torch.stack(boxes, dim=1),
            reg_feats=torch.stack(regs, dim=1),
            selection=selections,
            select_logits=logits_out,
            kept=kept_out,
            steps=steps,
            patch_feats=feats if return_tokens else None,
            select_scores=scores_out,
        )

    def _merged_inputs(
        self, patches: torch.Tensor, selection: torch.Tensor, scale: int
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Inference inputs of one scale: kept patches (padded to the batch maximum) + one merged constant.

        Only kept patches are embedded. Key bias: 0 for a kept patch, -inf for padding, log(Nc) for the
        merged constant (paper eq. 5), -inf when a sample has no constant token.
        """
        batch, total, _ = patches.shape
        kept = selection > 0
        counts = kept.sum(dim=1)
        width = max(int(counts.max()), 1)
        order = torch.argsort((~kept).to(torch.int8), dim=1, stable=True)[:, :width]  # kept first, raster
        valid = torch.arange(width, device=patches.device)[None] < counts[:, None]
        gathered = torch.gather(patches, 1, order[..., None].expand(-1, -1, patches.shape[2]))
        tokens = self.patch_embeddings(gathered, order, scale) + self.token_type_embeddings.weight[1]
        key_bias = torch.zeros(batch, width, dtype=torch.float32, device=patches.device)
        key_bias = key_bias.masked_fill(~valid, float("-inf"))
        num_const = total - counts
        has_const = bool((num_const > 0).any())
        if has_const:
            const = self.constant_input().to(tokens.dtype).view(1, 1, -1).expand(batch, 1, -1)
            tokens = torch.cat([tokens, const], dim=1)
            const_bias = torch.where(
                num_const > 0, num_const.clamp(min=1).float().log(), torch.full_like(key_bias[:, 0], -math.inf)
            )
            key_bias = torch.cat([key_bias, const_bias[:, None]], dim=1)
        slots = {"order": order, "valid": valid, "has_const": has_const}
        return tokens, key_bias, slots

    @staticmethod
    def _scatter_slots(values: torch.Tensor, slots: dict[str, Any], total: int, fill: float) -> torch.Tensor:
        """Per-slot values [B, width(+1)] -> per-grid-position [B, total]; positions not kept get ``fill``."""
        order, valid = slots["order"], slots["valid"]
        out = values.new_full((values.shape[0], total), fill)
        kept_values = values[:, : order.shape[1]].masked_fill(~valid, fill)
        for b in range(values.shape[0]):
            out[b, order[b][valid[b]]] = kept_values[b][valid[b]]
        return out

    @staticmethod
    def _expand_slots(hidden: torch.Tensor, slots: dict[str, Any], total: int) -> torch.Tensor:
        """Hidden states per slot -> per grid position; every constant position gets the merged token's."""
        order, valid = slots["order"], slots["valid"]
        batch, _, dim = hidden.shape
        if slots["has_const"]:
            out = hidden[:, -1:].expand(batch, total, dim).clone()
        else:
            out = hidden.new_zeros(batch, total, dim)
        for b in range(batch):
            out[b, order[b][valid[b]]] = hidden[b, : order.shape[1]][valid[b]]
        return out


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------------------- losses


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def generalized_box_iou(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """GIoU of paired xyxy boxes [..., 4] (Rezatofighi et al. 2019): IoU - |C \\ (A u B)| / |C|."""
    area_a = (boxes_a[..., 2] - boxes_a[..., 0]).clamp(min=0) * (boxes_a[..., 3] - boxes_a[..., 1]).clamp(min=0)
    area_b = (boxes_b[..., 2] - boxes_b[..., 0]).clamp(min=0) * (boxes_b[..., 3] - boxes_b[..., 1]).clamp(min=0)
    top_left = torch.maximum(boxes_a[..., :2], boxes_b[..., :2])
    bottom_right = torch.minimum(boxes_a[..., 2:], boxes_b[..., 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=1e-7)
    hull = (torch.maximum(boxes_a[..., 2:], boxes_b[..., 2:]) - torch.minimum(boxes_a[..., :2], boxes_b[..., :2]))
    hull_area = hull.clamp(min=0).prod(dim=-1)
    return iou - (hull_area - union) / hull_area.clamp(min=1e-7)


def scanformer_losses(out: ScanOutput, target_boxes: torch.Tensor, cfg: ScanFormerConfig) -> dict[str, torch.Tensor]:
    """Paper eq. 7-9 for normalised (cx, cy, w, h) targets [B, 4].

    L1 per scale = sum over the 4 coordinates, mean over the batch (VG-LAW's sum / batch); GIoU per scale =
    mean of 1 - GIoU; sparse = lambda_sparse * sum_{l >= 1} mean_batch (mean_i s_i^l - beta^l)^2.
    """
    target = target_boxes.to(out.boxes.dtype)
    total = out.boxes.new_zeros(())
    losses: dict[str, torch.Tensor] = {}
    for scale in range(cfg.num_scales):
        pred = out.boxes[:, scale]
        l1 = (pred - target).abs().sum(dim=-1).mean()
        giou = (1 - generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target))).mean()
        losses[f"l1_{scale}"] = l1
        losses[f"giou_{scale}"] = giou
        total = total + cfg.l1_weights[scale] * l1 + cfg.giou_weights[scale] * giou
    sparse = out.boxes.new_zeros(())
    for scale in range(1, cfg.num_scales):
        ratio = out.selection[scale].float().mean(dim=1)
        sparse = sparse + ((ratio - cfg.sparse_targets[scale - 1]) ** 2).mean()
    losses["sparse"] = cfg.sparse_weight * sparse
    losses["bbox"] = total
    losses["total"] = total + losses["sparse"]
    return losses


# --------------------------------------------------------------------------------------------- checkpoints


def save_scanformer_checkpoint(model: ScanFormer, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """``{"format", "config", "state_dict", "extra"}`` - plain values only, readable with weights_only=True."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": model.cfg.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": json.loads(json.dumps(extra or {})),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)


def load_scanformer_checkpoint(path: str | Path) -> ScanFormer:
    """Build the model from the file's config and load its weights strictly (any mismatch raises)."""
    payload = load_checkpoint_file(path)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{Path(path).name} is not a {CHECKPOINT_FORMAT} checkpoint")
    model = ScanFormer(ScanFormerConfig.from_dict(payload["config"]))
    load_state_dict_strict(model, payload["state_dict"], source=Path(path).name)
    return model


# --------------------------------------------------------------------------------------------- service


@dataclass
class Letterbox:
    """How an original image sits on the square canvas: canvas = original * ratio + (pad_x, pad_y)."""

    ratio: float
    pad_x: int
    pad_y: int
    width: int
    height: int


def preprocess_image(image: Image.Image, cfg: ScanFormerConfig) -> tuple[torch.Tensor, Letterbox]:
    """[choice] The author's REC convention (VG-LAW) with ViLT's normalisation, since the weights are ViLT's.

    RGB; resize so the LONGER side = ``image_size`` (aspect kept, bicubic, as ViLT resizes); scale to [0, 1];
    normalise with ``pixel_mean`` / ``pixel_std`` (0.5 / 0.5); zero-pad (in normalised space) to a square
    canvas with the image centred. Returns [3, S, S] and the letterbox to map boxes back.
    """
    image = image.convert("RGB")
    width, height = image.size
    size = cfg.image_size
    ratio = size / max(width, height)
    new_w, new_h = max(1, round(width * ratio)), max(1, round(height * ratio))
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    array = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(cfg.pixel_mean).view(3, 1, 1)
    std = torch.tensor(cfg.pixel_std).view(3, 1, 1)
    array = (array - mean) / std
    canvas = torch.zeros(3, size, size)
    pad_x, pad_y = (size - new_w) // 2, (size - new_h) // 2
    canvas[:, pad_y : pad_y + new_h, pad_x : pad_x + new_w] = array
    return canvas, Letterbox(ratio=ratio, pad_x=pad_x, pad_y=pad_y, width=width, height=height)


def canvas_box_to_image(box_cxcywh: Sequence[float], letterbox: Letterbox, canvas_size: int) -> list[float]:
    """Normalised canvas (cx, cy, w, h) -> original-image (x1, y1, x2, y2), clipped to the image."""
    cx, cy, w, h = (float(v) * canvas_size for v in box_cxcywh)
    x1 = (cx - w / 2 - letterbox.pad_x) / letterbox.ratio
    y1 = (cy - h / 2 - letterbox.pad_y) / letterbox.ratio
    x2 = (cx + w / 2 - letterbox.pad_x) / letterbox.ratio
    y2 = (cy + h / 2 - letterbox.pad_y) / letterbox.ratio
    x1, x2 = (min(max(v, 0.0), float(letterbox.width)) for v in (x1, x2))
    y1, y2 = (min(max(v, 0.0), float(letterbox.height)) for v in (y1, y2))
    return [x1, y1, x2, y2]


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def tokenize_expressions(expressions: Sequence[str], tokenizer: Any, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT ids and attention mask [N, max_len] as ViLT's collate makes them (truncated, padded to max_len); each
    row depends on its own text only. Training and serving share it."""
    encoded = tokenizer(list(expressions), padding="max_length", truncation=True, max_length=max_len,
                        return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


class ScanFormerGrounder:
    """What the /ground route calls: image + expressions -> boxes in original-image pixels.

    Preprocessing: :func:`preprocess_image` (longer side -> ``image_size``, bicubic, mean/std 0.5, centred zero
    pad to a square); text: ``models.tokenizers.bert_tokenizer()`` (bert-base-uncased, lower case), padded and
    truncated to ``max_text_len`` = 40 tokens ([CLS] ... [SEP], as ViLT). All expressions of one call run as
    one batch over the same image.
    """

    method = "scanformer"

    def __init__(self, model: ScanFormer, device: str = "cpu", precision: str = "fp32", version: str = "") -> None:
        if precision not in ("fp32", "bf16", "fp16", "official"):
            raise ValueError(f"unknown precision {precision!r}")
        self.model = model.to(device).eval()
        self.cfg = model.cfg
        self.device = device
        self.precision = precision  # "official" = fp32: there are no official weights, ours train in fp32
        self.version = version or "scanformer-unversioned"
        from models.tokenizers import bert_tokenizer

        self.tokenizer = bert_tokenizer()

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", precision: str = "fp32") -> ScanFormerGrounder:
        """A trained ScanFormer checkpoint (:func:`save_scanformer_checkpoint`), loaded strictly."""
        model = load_scanformer_checkpoint(path)
        return cls(model, device, precision, version=f"scanformer-{file_version(path)}")

    @classmethod
    def from_config(
        cls,
        config: ScanFormerConfig | None = None,
        device: str = "cpu",
        precision: str = "fp32",
        seed: int = 0,
    ) -> ScanFormerGrounder:
        """Random initialisation (demo / tests): the boxes mean nothing until trained."""
        config = config or ScanFormerConfig()
        torch.manual_seed(seed)
        model = ScanFormer(config)
        digest = zlib.crc32(json.dumps(config.to_dict(), sort_keys=True).encode()) & 0xFFFFFFFF
        return cls(model, device, precision, version=f"scanformer-random-{digest:08x}-seed{seed}")

    def tokenize(self, expressions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return tokenize_expressions(expressions, self.tokenizer, self.cfg.vilt.max_text_len)

    @torch.inference_mode()
    def ground(self, image: Image.Image, expressions: list[str]) -> list[dict[str, Any]]:
        """One dict per expression: ``box_xyxy`` / ``box_xywh`` (original pixels), ``per_scale_boxes``
        (xyxy, coarse to fine), ``kept_patches`` / ``total_patches`` per scale, ``time_ms`` (the whole call:
        preprocessing + scan of all expressions together), ``box_normalized`` ((cx, cy, w, h) on the canvas).
        """
        if not expressions:
            return []
        start = time.perf_counter()
        canvas, letterbox = preprocess_image(image, self.cfg)
        text_ids, text_mask = self.tokenize(expressions)
        batch = len(expressions)
        pixel_values = canvas.unsqueeze(0).expand(batch, -1, -1, -1).to(self.device)
        text_ids, text_mask = text_ids.to(self.device), text_mask.to(self.device)
        dtype = _AUTOCAST_DTYPES.get(self.precision)
        device_type = "cuda" if str(self.device).startswith("cuda") else "cpu"
        with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = self.model(text_ids, text_mask, pixel_values)
        boxes = out.boxes.float().cpu().numpy()
        kept = out.kept_counts.cpu().tolist()
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        totals = [g * g for g in self.cfg.grid_sizes]
        results = []
        for i, expression in enumerate(expressions):
            per_scale = [canvas_box_to_image(b, letterbox, self.cfg.image_size) for b in boxes[i]]
            x1, y1, x2, y2 = per_scale[-1]
            results.append(
                {
                    "expression": expression,
                    "box_xyxy": [x1, y1, x2, y2],
                    "box_xywh": [x1, y1, x2 - x1, y2 - y1],
                    "box_normalized": [float(v) for v in boxes[i, -1]],
                    "per_scale_boxes": per_scale,
                    "kept_patches": [int(k) for k in kept[i]],
                    "total_patches": totals,
                    "time_ms": elapsed_ms,
                }
            )
        return results
