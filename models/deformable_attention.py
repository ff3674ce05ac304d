"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021, Eq. 3) and the Mask2Former pixel decoder.

Plain PyTorch only: sampling uses ``F.grid_sample`` (bilinear, zero padding, ``align_corners=False``,
grid = 2 * location - 1), which is the path the MagNet release actually runs (its CUDA call is commented
out), so it is also the numerical reference. State-dict names follow Mask2Former's
``pixel_decoder.{input_proj, transformer.level_embed, transformer.encoder.layers.N, mask_features}``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """DETR sine position encoding, normalised to (0, 2*pi]; output (B, 2 * num_feats, H, W) as [y, x]."""

    def __init__(self, num_feats: int = 128, temperature: float = 10000.0):
        super().__init__()
        self.num_feats = num_feats
        self.temperature = temperature
        self.scale = 2 * math.pi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        ones = torch.ones((b, h, w), device=x.device, dtype=torch.float32)
        y_embed = ones.cumsum(1)
        x_embed = ones.cumsum(2)
        eps = 1e-6
        y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
        x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_feats)
        pos_x = x_embed[..., None] / dim_t
        pos_y = y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


SAMPLE_CHUNK_BYTES = 64 * 2 ** 20  # bound on the (B*heads, d, queries, levels*points) temporary


def deformable_sample(value: torch.Tensor, shapes: list[tuple[int, int]], locations: torch.Tensor,
                      weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of bilinear samples per head, level and point (Deformable DETR Eq. 3).

    value: (B, S, heads, d); locations: (B, Q, heads, levels, points, 2) in [0, 1] (x, y);
    weights: (B, Q, heads, levels, points). Returns (B, Q, heads * d).
    Queries are processed in chunks so the stacked samples stay small (at 480 px one image has 19125 queries);
    every query's samples and its 16-term sum are computed exactly as in one piece.
    """
    b, _, heads, d = value.shape
    _, q, _, levels, points, _ = locations.shape
    level_values = [
        part.flatten(2).transpose(1, 2).reshape(b * heads, d, h, w)
        for part, (h, w) in zip(value.split([h * w for h, w in shapes], dim=1), shapes, strict=True)
    ]
    grids = (2 * locations - 1).transpose(1, 2).flatten(0, 1)  # (B*heads, Q, levels, points, 2)
    weights = weights.transpose(1, 2).reshape(b * heads, 1, q, levels * points)
    per_query_bytes = b * heads * d * levels * points * value.element_size()
    chunk = max(1, SAMPLE_CHUNK_BYTES // per_query_bytes)
    outs = []
    for start in range(0, q, chunk):
        stop = min(q, start + chunk)
        # Each level's grid is made contiguous: PyTorch's CPU grid sampler takes its vectorised kernel only for a
        # contiguous grid (the same samples bit for bit, 2.5-3x faster; the input gradient rounds differently).
        samples = [
            F.grid_sample(level_value, grids[:, start:stop, level].contiguous(), mode="bilinear",
                          padding_mode="zeros", align_corners=False)  # (B*heads, d, chunk, points)
            for level, level_value in enumerate(level_values)
        ]
        outs.append((torch.stack(samples, dim=-2).flatten(-2) * weights[:, :, start:stop]).sum(-1))
    out = torch.cat(outs, dim=-1).view(b, heads * d, q)
    return out.transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention: each query samples ``points`` locations per head and level."""

    def __init__(self, dim: int = 256, levels: int = 4, heads: int = 8, points: int = 4):
        super().__init__()
        self.dim, self.levels, self.heads, self.points = dim, levels, heads, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, source: torch.Tensor,
                shapes: list[tuple[int, int]]) -> torch.Tensor:
        """query (B, Q, C); reference_points (B, Q, levels, 2) in [0, 1]; source (B, S, C) of all levels."""
        b, q, _ = query.shape
        value = self.value_proj(source).view(b, source.shape[1], self.heads, self.dim // self.heads)
        offsets = self.sampling_offsets(query).view(b, q, self.heads, self.levels, self.points, 2)
        weights = self.attention_weights(query).view(b, q, self.heads, self.levels * self.points)
        weights = weights.softmax(-1).view(b, q, self.heads, self.levels, self.points)
        normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype, device=query.device)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        return self.output_proj(deformable_sample(value, shapes, locations, weights))


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention, then FFN (ReLU)."""

    def __init__(self, dim: int = 256, ffn_dim: int = 1024, levels: int = 4, heads: int = 8, points: int = 4):
        super().__init__()
        self.self_attn = MSDeformAttn(dim, levels, heads, points)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, reference_points: torch.Tensor,
                shapes: list[tuple[int, int]]) -> torch.Tensor:
        src = self.norm1(src + self.self_attn(src + pos, reference_points, src, shapes))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class DeformableEncoder(nn.Module):
    """Stack of encoder layers; reference points are pixel centres, normalised per level (no padding)."""

    def __init__(self, num_layers: int, **layer_kwargs: int):
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(**layer_kwargs) for _ in range(num_layers))

    @staticmethod
    def reference_points(shapes: list[tuple[int, int]], batch: int, device: torch.device) -> torch.Tensor:
        per_level = []
        for h, w in shapes:
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
                torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
                indexing="ij",
            )
            per_level.append(torch.stack((ref_x.reshape(-1) / w, ref_y.reshape(-1) / h), -1))
        points = torch.cat(per_level, 0)  # (S, 2); valid ratios are all 1
        return points[None, :, None, :].expand(batch, -1, len(shapes), -1)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
        reference_points = self.reference_points(shapes, src.shape[0], src.device)
        for layer in self.layers:
            src = layer(src, pos, reference_points, shapes)
        return src


class DeformableTransformerEncoderOnly(nn.Module):
    """Mask2Former's ``MSDeformAttnTransformerEncoderOnly``: level embeddings + the encoder stack."""

    def __init__(self, dim: int = 256, heads: int = 8, num_layers: int = 4, ffn_dim: int = 1024, levels: int = 4,
                 points: int = 4):
        super().__init__()
        self.encoder = DeformableEncoder(num_layers, dim=dim, ffn_dim=ffn_dim, levels=levels, heads=heads,
                                         points=points)
        self.level_embed = nn.Parameter(torch.zeros(levels, dim))

    def forward(self, srcs: list[torch.Tensor], pos_embeds: list[torch.Tensor]
                ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        shapes = [(int(s.shape[2]), int(s.shape[3])) for s in srcs]
        flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[i].view(1, 1, -1) for i, p in enumerate(pos_embeds)], 1
        )
        return self.encoder(flat, pos, shapes), shapes


class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former pixel decoder over all four backbone scales (stride 4 is an encoder level, so no FPN convs).

    ``in_channels`` lists the backbone channels from high to low resolution (s1..s4); the encoder runs on
    them from low to high resolution. Returns (mask features at stride 4, the three lowest-resolution
    encoder outputs for the transformer decoder).
    """

    def __init__(self, in_channels: tuple[int, ...] = (128, 256, 512, 1024), dim: int = 256, mask_dim: int = 256,
                 heads: int = 8, enc_layers: int = 4, ffn_dim: int = 1024, groups: int = 32):
        super().__init__()
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, dim, kernel_size=1), nn.GroupNorm(groups, dim)) for c in in_channels[::-1]
        )
        self.transformer = DeformableTransformerEncoderOnly(dim, heads, enc_layers, ffn_dim, len(in_channels))
        self.pe_layer = PositionEmbeddingSine(dim // 2)
        self.mask_features = nn.Conv2d(dim, mask_dim, kernel_size=1)
        self.num_decoder_levels = 3  # Mask2Former always feeds 3 scales to the transformer decoder

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """features: backbone maps from high to low resolution (s1..s4)."""
        low_to_high = features[::-1]
        srcs = [proj(f.float()) for proj, f in zip(self.input_proj, low_to_high, strict=True)]
        pos = [self.pe_layer(f) for f in low_to_high]
        memory, shapes = self.transformer(srcs, pos)
        outs = []
        start = 0
        for h, w in shapes:
            outs.append(memory[:, start:start + h * w].transpose(1, 2).reshape(memory.shape[0], -1, h, w))
            start += h * w
        return self.mask_features(outs[-1]), outs[: self.num_decoder_levels]
