"""MagNet image encoder: Swin-B (LAVT / mmseg variant) with the image side of the Cross-modal Alignment Module.

Reproduces ``lib/backbone.py`` and ``lib/multimodal_swin.py`` of yxchng/mask-grounding @ 2debc7ed:

- Swin blocks pad every feature map to a multiple of the window *after* ``norm1`` and never shrink the window
  or drop the shift (at 480 px the 30x30 and 15x15 maps are attended as 36x36 and 24x24; the zero padding
  takes part in attention, only the cyclic-shift regions are masked with -100.0). timm's Swin clamps the
  window instead, which the released weights were not trained with.
- After the blocks of stage k the CAM runs (paper Sec. 3.2, "Cross-modal Alignment Module"): four pooled
  pyramid branches (adaptive average pool 1/2/3/6, a 3-layer 1x1-conv MLP, a PWAM against the words,
  bilinear ``align_corners=True`` upsampling), plus the full-resolution PWAM. The full-resolution PWAM output
  updates the backbone stream through a tanh gate; the mixer of all five outputs goes to the decoder only.

State-dict names follow the official ``image_model.*`` layout (``layers.{k}.blocks.{j}``, ``fusion``,
``fusions``, ``pyramids``, ``mixer``, ``res_gate``, ``downsample``, ``norm{k}``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SHIFT_MASK_VALUE = -100.0  # official value for cross-region pairs in shifted windows
PYRAMID_POOL_SIZES = (1, 2, 3, 6)
LANGUAGE_DIM = 768


# --------------------------------------------------------------------------------------------- windows


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * num_windows, window, window, C); H and W must be multiples of ``window``."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * num_windows, window, window, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    b = windows.shape[0] // ((h // window) * (w // window))
    x = windows.view(b, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def padded_size(size: int, window: int) -> int:
    """Feature size after padding to a window multiple (mmseg/LAVT rule; the window itself never shrinks)."""
    return int(math.ceil(size / window)) * window


def shifted_window_mask(height: int, width: int, window: int, device: torch.device) -> torch.Tensor:
    """Additive mask (num_windows, window^2, window^2) for SW-MSA on the padded map: 0 inside a region, -100 across.

    Regions are the official three slices per axis: [0, -window), [-window, -shift), [-shift, end).
    """
    shift = window // 2
    hp, wp = padded_size(height, window), padded_size(width, window)
    labels = torch.zeros((1, hp, wp, 1), device=device)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    region = 0
    for rows in bounds:
        for cols in bounds:
            labels[:, rows, cols, :] = region
            region += 1
    label_windows = window_partition(labels, window).view(-1, window * window)
    diff = label_windows.unsqueeze(1) - label_windows.unsqueeze(2)
    return diff.masked_fill(diff != 0, SHIFT_MASK_VALUE).masked_fill(diff == 0, 0.0)


def relative_position_index(window: int) -> torch.Tensor:
    """(window^2, window^2) int64 index into the (2*window-1)^2 relative-position bias table (Swin, Eq. 4)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[:, :, 0] * (2 * window - 1) + rel[:, :, 1]


# --------------------------------------------------------------------------------------------- Swin blocks


class Mlp(nn.Module):
    """Swin feed-forward: fc1 -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window with a learned relative-position bias (Swin Eq. 4)."""

    def __init__(self, dim: int, window: int, num_heads: int):
        super().__init__()
        self.window = window
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        # persistent: the official checkpoints store it (24 int64 entries of the 1310)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=True)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B * num_windows, N, C); mask: (num_windows, N, N) additive or None."""
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
    """Pre-norm (S)W-MSA + MLP block; pads to a window multiple after ``norm1`` and crops afterwards."""

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, height: int, width: int, shift_mask: torch.Tensor) -> torch.Tensor:
        b, length, c = x.shape
        if length != height * width:
            raise ValueError(f"token count {length} != {height}x{width}")
        shortcut = x
        x = self.norm1(x).view(b, height, width, c)
        pad_r = (self.window - width % self.window) % self.window
        pad_b = (self.window - height % self.window) % self.window
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))  # zero tokens after norm1; they take part in attention
        hp, wp = x.shape[1], x.shape[2]
        if self.shift > 0:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = window_partition(x, self.window).view(-1, self.window * self.window, c)
        windows = self.attn(windows, mask=shift_mask if self.shift > 0 else None)
        x = window_reverse(windows.view(-1, self.window, self.window, c), self.window, hp, wp)
        if self.shift > 0:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x[:, :height, :width, :].reshape(b, height * width, c)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat (order x[0::2,0::2], x[1::2,0::2], x[0::2,1::2], x[1::2,1::2]) -> LN -> Linear."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, height, width, c)
        if height % 2 or width % 2:
            x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class PatchEmbed(nn.Module):
    """4x4 stride-4 conv + LayerNorm; pads the image on the right/bottom to a multiple of 4."""

    def __init__(self, in_chans: int, dim: int, patch: int = 4):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Returns tokens (B, H/4 * W/4, C) and the token grid size."""
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (-w) % self.patch, 0, (-h) % self.patch))
        x = self.proj(x)
        gh, gw = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), gh, gw


# --------------------------------------------------------------------------------------------- CAM (image side)


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over dim 1 of (B, C, H, W), eps 1e-6 (the official CAM pyramid ``LayerNorm``)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class PixelWordAttention(nn.Module):
    """Pixels attend over words (LAVT's ``SpatialImageLanguageAttention``, image side).

    query = LN(Linear(x)); key/value = Conv1d(words) * binary mask; one head; scale ``key_dim^-0.5``;
    ``+ (1e4 * mask - 1e4)`` before the softmax over words; out = LN(Linear(attended values)).
    """

    def __init__(self, vis_dim: int, lang_dim: int, key_dim: int, value_dim: int, num_heads: int = 1):
        super().__init__()
        self.num_heads, self.key_dim, self.value_dim = num_heads, key_dim, value_dim
        self.f_key = nn.Sequential(nn.Conv1d(lang_dim, key_dim, kernel_size=1))
        self.f_query = nn.Sequential(nn.Linear(vis_dim, key_dim), nn.LayerNorm(key_dim))
        self.f_value = nn.Sequential(nn.Conv1d(lang_dim, value_dim, kernel_size=1))
        self.W = nn.Sequential(nn.Linear(value_dim, value_dim), nn.LayerNorm(value_dim))  # official name "W"

    def forward(self, x: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """x: (B, HW, Cv); words: (B, Cl, T); word_mask: (B, T, 1) binary. Returns (B, HW, value_dim)."""
        b, hw = x.shape[:2]
        mask = word_mask.permute(0, 2, 1).to(x.dtype)  # (B, 1, T)
        heads = self.num_heads
        query = self.f_query(x).reshape(b, hw, heads, self.key_dim // heads).permute(0, 2, 1, 3)
        key = (self.f_key(words) * mask).reshape(b, heads, self.key_dim // heads, -1)
        value = (self.f_value(words) * mask).reshape(b, heads, self.value_dim // heads, -1)
        sim = (self.key_dim ** -0.5) * (query @ key)
        sim = sim + (1e4 * mask.unsqueeze(1) - 1e4)
        out = sim.softmax(dim=-1) @ value.permute(0, 1, 3, 2)
        return self.W(out.permute(0, 2, 1, 3).reshape(b, hw, self.value_dim))


class ImagePWAM(nn.Module):
    """Pixel-Word Attention Module, image side: GELU(Conv1d(x)) * attended words -> GELU(Conv1d)."""

    def __init__(self, dim: int, lang_dim: int = LANGUAGE_DIM, num_heads: int = 1):
        super().__init__()
        self.vis_project = nn.Sequential(nn.Conv1d(dim, dim, 1), nn.GELU())
        self.image_lang_att = PixelWordAttention(dim, lang_dim, dim, dim, num_heads)
        self.project_mm = nn.Sequential(nn.Conv1d(dim, dim, 1), nn.GELU())

    def forward(self, x: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """x: (B, HW, C); words: (B, T, Cl); word_mask: (B, T, 1). Returns (B, HW, C)."""
        vis = self.vis_project(x.transpose(1, 2))
        lang = self.image_lang_att(x, words.transpose(1, 2), word_mask).transpose(1, 2)
        return self.project_mm(vis * lang).transpose(1, 2)


def pyramid_branch(dim: int, pool: int) -> nn.Sequential:
    """Paper's pooled "3-layer MLP": pool -> 1x1 C->4C -> LN(eps 1e-6) -> 1x1 4C->C -> GELU -> 1x1 C->C/4."""
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(pool),
        nn.Conv2d(dim, dim * 4, kernel_size=1, bias=False),
        ChannelsFirstLayerNorm(dim * 4),
        nn.Conv2d(dim * 4, dim, kernel_size=1, bias=False),
        nn.GELU(),
        nn.Conv2d(dim, dim // 4, kernel_size=1, bias=False),
    )


class MultiModalStage(nn.Module):
    """One Swin stage + the image-side CAM (the official ``MMBasicLayer``)."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: int, mlp_ratio: float,
                 downsample: bool, lang_dim: int = LANGUAGE_DIM, fusion_heads: int = 1):
        super().__init__()
        self.dim, self.window = dim, window
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio) for i in range(depth)
        )
        self.fusion = ImagePWAM(dim, lang_dim, fusion_heads)
        self.res_gate = nn.Sequential(  # tanh gate on the stream update (GELU here, ReLU on the language side)
            nn.Linear(dim, dim, bias=False), nn.GELU(), nn.Linear(dim, dim, bias=False), nn.Tanh()
        )
        self.psizes = PYRAMID_POOL_SIZES
        self.reduction_dim = dim // 4
        self.pyramids = nn.ModuleList(pyramid_branch(dim, p) for p in self.psizes)
        self.fusions = nn.ModuleList(ImagePWAM(self.reduction_dim, lang_dim, fusion_heads) for _ in self.psizes)
        self.mixer = nn.Sequential(nn.Linear(dim * 2, dim), nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.downsample = PatchMerging(dim) if downsample else None

    def forward_blocks(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The Swin blocks of this stage on tokens (B, H*W, C)."""
        mask = shifted_window_mask(height, width, self.window, x.device).to(x.dtype)
        for block in self.blocks:
            x = block(x, height, width, mask)
        return x

    def forward_fusion(self, x: torch.Tensor, height: int, width: int, words: torch.Tensor,
                       word_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Image-side CAM on the stage output x (B, H*W, C).

        Returns (decoder feature s_k (B, C, H, W), the next stage's input tokens, its grid height, width).
        """
        b = x.shape[0]
        grid = x.transpose(1, 2).reshape(b, self.dim, height, width)
        branches = []
        for pool, pyramid, fusion in zip(self.psizes, self.pyramids, self.fusions, strict=True):
            pooled = pyramid(grid).flatten(2).transpose(1, 2)  # (B, p*p, C/4)
            fused = fusion(pooled, words, word_mask).transpose(1, 2).reshape(b, self.reduction_dim, pool, pool)
            # the pyramid outputs go back to H x W with bilinear align_corners=True (official)
            up = F.interpolate(fused, size=(height, width), mode="bilinear", align_corners=True)
            branches.append(up.flatten(2).transpose(1, 2))
        x_residual = self.fusion(x, words, word_mask)
        branches.append(x_residual)
        # the stream continues with the tanh-gated full-resolution residual only (not the mixer output)
        x = x + self.res_gate(x_residual) * x_residual
        mixed = self.mixer(torch.cat(branches, dim=2))
        decoder_feature = mixed.view(b, height, width, self.dim).permute(0, 3, 1, 2).contiguous()
        if self.downsample is None:
            return decoder_feature, x, height, width
        return decoder_feature, self.downsample(x, height, width), (height + 1) // 2, (width + 1) // 2


class MultiModalSwin(nn.Module):
    """Swin backbone with the image-side CAM at every stage (official ``image_model``)."""

    def __init__(self, embed_dim: int = 128, depths: tuple[int, ...] = (2, 2, 18, 2),
                 num_heads: tuple[int, ...] = (4, 8, 16, 32), window: int = 12, mlp_ratio: float = 4.0,
                 lang_dim: int = LANGUAGE_DIM, fusion_heads: tuple[int, ...] = (1, 1, 1, 1)):
        super().__init__()
        self.window = window
        self.patch_embed = PatchEmbed(3, embed_dim)
        self.num_features = [embed_dim * 2 ** i for i in range(len(depths))]
        self.layers = nn.ModuleList(
            MultiModalStage(self.num_features[i], depths[i], num_heads[i], window, mlp_ratio,
                            downsample=i < len(depths) - 1, lang_dim=lang_dim, fusion_heads=fusion_heads[i])
            for i in range(len(depths))
        )
        # norm0..norm3 are in the checkpoints but the official inference graph never applies them
        for i, dim in enumerate(self.num_features):
            self.add_module(f"norm{i}", nn.LayerNorm(dim))

    def forward_stem(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        return self.patch_embed(pixel_values)
