"""CLIP building blocks (OpenAI CLIP ViT, as IRRA and other CLIP-initialised methods use it), written once.

Parameter names are those of the OpenAI / IRRA checkpoints (``visual.conv1.weight``,
``transformer.resblocks.N.attn.in_proj_weight``, ``ln_final``, ``text_projection``, ...), so official state
dicts load strictly. Layout facts reproduced (IRRA ``model/clip_model.py`` @ cfc2378):

- pre-LN residual blocks ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))`` with a QuickGELU MLP ``c_fc -> c_proj``;
- attention is ``nn.MultiheadAttention`` (packed q,k,v ``in_proj_weight``), sequence-first (L, N, D);
- ``LayerNorm`` always computes in float32 and casts back to its input dtype (so fp16 weights work);
- the vision tower accepts a non-square image and a patch stride (IRRA: 384x128, stride 16 -> 24x8 grid),
  applies ``ln_post`` and ``proj`` to *all* tokens;
- the text tower adds a causal mask (-inf strictly above the diagonal) and projects *all* positions.

``convert_weights_to_fp16`` reproduces the official ``convert_weights`` dtype placement.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
    """CLIP's GELU approximation ``x * sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm (eps 1e-5) that computes in float32 and returns the input dtype (CLIP's fp16-safe LN)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        out = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return out.to(input_dtype)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: ``x += attn(ln_1(x)); x += mlp(ln_2(x))``; input is (L, N, D)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)  # packed in_proj_weight [3D, D] in q, k, v order
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, width * 4))
        self.mlp.add_module("gelu", QuickGELU())  # no parameters; keeps c_fc/c_proj names as in CLIP
        self.mlp.add_module("c_proj", nn.Linear(width * 4, width))
        self.ln_2 = LayerNorm(width)

    def attention(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        if attn_mask is not None:
            attn_mask = attn_mask.to(dtype=x.dtype, device=x.device)  # official casts the mask to x's dtype
        return self.attn(x, x, x, need_weights=False, attn_mask=attn_mask)[0]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x), attn_mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    """A stack of ``ResidualAttentionBlock`` named ``resblocks.N``; input and output are (L, N, D)."""

    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x

    def init_weights(self) -> None:
        """CLIP's initialisation of the blocks (attn_std = w^-0.5, proj_std = attn_std * (2 L)^-0.5)."""
        attn_std = self.width**-0.5
        proj_std = attn_std * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)


class VisionTransformer(nn.Module):
    """CLIP ViT image tower on a (H, W) image with patch ``patch_size`` and step ``stride_size``.

    Grid: ``num_y = (H - p) // s + 1`` rows, ``num_x = (W - p) // s + 1`` columns, flattened row-major
    (position index ``1 + y * num_x + x``); the class token goes first. Returns all tokens after
    ``ln_post`` and ``@ proj``: [N, 1 + num_y * num_x, output_dim].
    """

    def __init__(self, input_resolution: tuple[int, int], patch_size: int, stride_size: int, width: int,
                 layers: int, heads: int, output_dim: int):
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        self.num_y = (input_resolution[0] - patch_size) // stride_size + 1
        self.num_x = (input_resolution[1] - patch_size) // stride_size + 1
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=stride_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(self.num_y * self.num_x + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, output_dim))
        self.init_weights()

    def init_weights(self) -> None:
        scale = self.conv1.out_channels**-0.5
        nn.init.normal_(self.class_embedding, std=scale)
        nn.init.normal_(self.positional_embedding, std=scale)
        nn.init.normal_(self.proj, std=scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # [N, width, num_y, num_x]
        x = x.flatten(2).permute(0, 2, 1)  # [N, num_y * num_x, width], row-major grid
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # blocks run sequence-first
        x = self.ln_post(x)
        return x @ self.proj


def build_causal_mask(length: int) -> torch.Tensor:
    """Additive text mask: 0 on and below the diagonal, -inf strictly above it."""
    return torch.full((length, length), float("-inf")).triu_(1)


class CLIP(nn.Module):
    """OpenAI CLIP (ViT image tower + causal text transformer); ``encode_*`` return all tokens, projected.

    The text-tower pieces sit directly on this module, as in the official checkpoints:
    ``token_embedding``, ``positional_embedding``, ``transformer``, ``ln_final``, ``text_projection``.
    """

    def __init__(self, embed_dim: int, image_resolution: tuple[int, int], vision_layers: int,
                 vision_width: int, vision_heads: int, vision_patch_size: int, stride_size: int,
                 context_length: int, vocab_size: int, transformer_width: int, transformer_heads: int,
                 transformer_layers: int):
        super().__init__()
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.visual = VisionTransformer(image_resolution, vision_patch_size, stride_size, vision_width,
                                        vision_layers, vision_heads, embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        # not a state_dict entry in the official files (a plain attribute there), hence persistent=False
        self.register_buffer("attn_mask", build_causal_mask(context_length), persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        """CLIP's initialisation (only used for random-init models; checkpoints overwrite it)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer.init_weights()
        self.visual.transformer.init_weights()
        nn.init.normal_(self.text_projection, std=self.transformer.width**-0.5)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of the towers: that of ``visual.conv1`` (fp16 after the official conversion)."""
        return self.visual.conv1.weight.dtype

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, 1 + grid, embed_dim] in the model dtype."""
        return self.visual(image.to(self.dtype))

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """[N, L] token ids (L <= context_length) -> [N, L, embed_dim] in the model dtype.

        With L < context_length the first L positional rows and the top-left L x L of the causal mask are
        used; with the mask every position sees only earlier ones, so the outputs equal the padded run's.
        """
        length = text.shape[1]
        if length > self.context_length:
            raise ValueError(f"text has {length} tokens, the model takes at most {self.context_length}")
        x = self.token_embedding(text).to(self.dtype)
        x = x + self.positional_embedding[:length].to(self.dtype)
        x = self.transformer(x.permute(1, 0, 2), self.attn_mask[:length, :length]).permute(1, 0, 2)
        x = self.ln_final(x).to(self.dtype)
        return x @ self.text_projection

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(image), self.encode_text(text)


def convert_weights_to_fp16(model: nn.Module) -> None:
    """The official ``convert_weights``: fp16 for Conv/Linear weights and biases, every
    ``nn.MultiheadAttention`` projection (packed or split, plus ``bias_k``/``bias_v``), and the ``proj`` /
    ``text_projection`` matrices. LayerNorms, embeddings and positional tables stay float32."""
    for module in model.modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            module.weight.data = module.weight.data.half()
            if module.bias is not None:
                module.bias.data = module.bias.data.half()
        if isinstance(module, nn.MultiheadAttention):
            for attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                         "in_proj_bias", "bias_k", "bias_v"):
                tensor = getattr(module, attr, None)
                if tensor is not None:
                    tensor.data = tensor.data.half()
        for attr in ("text_projection", "proj"):
            tensor = getattr(module, attr, None)
            if isinstance(tensor, torch.Tensor):
                tensor.data = tensor.data.half()


def resize_visual_pos_embed(pos_embed: torch.Tensor, num_y: int, num_x: int) -> torch.Tensor:
    """Fit a square CLIP position table [1 + g*g, D] to a (num_y, num_x) grid, as IRRA does when it starts
    from OpenAI weights: the class row is kept, the g x g grid goes through bilinear ``F.interpolate``
    (align_corners=False, no antialias) and is flattened row-major."""
    cls_row, grid = pos_embed[:1], pos_embed[1:]
    side = int(math.isqrt(grid.shape[0]))
    if side * side != grid.shape[0]:
        raise ValueError(f"expected a square grid of positions, got {grid.shape[0]}")
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(num_y, num_x), mode="bilinear")
    grid = grid.permute(0, 2, 3, 1).reshape(num_y * num_x, -1)
    return torch.cat([cls_row, grid], dim=0)
