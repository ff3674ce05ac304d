"""ViLT-B/32 (Kim et al., ICML 2021): one transformer over BERT word embeddings and 32x32 image patches.

Rebuilt from the facts of dandelin/ViLT @ 762fd397 (``vilt/modules/vilt_module.py``, ``vision_transformer.py``,
``heads.py``) with the parameter names of the official checkpoint (``vilt_200k_mlm_itm.ckpt``, weights under
``ckpt["state_dict"]``), so that checkpoint fills this module with ``load_state_dict(strict=True)``.

Official behaviour reproduced (checked by the parity fixtures ``tests/parity/vilt``):
- text: Hugging Face ``BertEmbeddings`` (word + 40 absolute positions + BERT token type 0, LayerNorm eps 1e-12);
- image: Conv2d(3, 768, 32, stride 32) patches in raster order, plus ``pos_embed[:, 1:]`` (a 12x12 grid) resized
  to the patch grid with bilinear ``align_corners=True``; the image class token (``cls_token + pos_embed[:, 0]``)
  goes in front of the patches; no LayerNorm before the blocks;
- a modality-type embedding (0 = text, 1 = image) added after both embeddings;
- 12 pre-norm blocks (LayerNorm eps 1e-6 - NOT the 1e-12 of Hugging Face's ViLT port), one fused ``qkv`` Linear
  with bias, exact-erf GELU, key-padding mask only; a final ``transformer.norm``;
- ``pooler``: tanh(Linear) of token 0, the text [CLS].

The attention takes an additive logit bias and a key/value cache (:class:`KVCache`), which ScanFormer uses for
its block-causal scan and for merging constant tokens (a +log(Nc) logit offset).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ViltConfig",
    "KVCache",
    "BertEmbeddings",
    "PatchEmbed",
    "Attention",
    "Mlp",
    "Block",
    "VisionTransformer",
    "Pooler",
    "MLMHead",
    "ITMHead",
    "ViltModel",
    "interpolate_pos_grid",
    "checkpoint_filter_fn",
]


@dataclass
class ViltConfig:
    """ViLT-B/32 settings (dandelin/ViLT ``vilt/config.py``: hidden 768, 12 heads, 12 layers, mlp_ratio 4)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_ratio: int = 4
    patch_size: int = 32
    pos_grid: int = 12  # pos_embed holds 1 + 12*12 rows (vit_base_patch32_384)
    max_text_len: int = 40
    type_vocab_size: int = 2  # BERT token types inside text_embeddings
    layer_norm_eps: float = 1e-6  # blocks and transformer.norm (timm ViT); HF's port wrongly uses 1e-12
    bert_layer_norm_eps: float = 1e-12  # text_embeddings.LayerNorm (HF BertEmbeddings)
    qkv_bias: bool = True
    drop_rate: float = 0.1  # ViLT's dropout in training (config ``drop_rate``); off in eval()
    with_pooler: bool = True
    with_pretrain_heads: bool = False  # mlm_score.* and itm_score.* of vilt_200k_mlm_itm.ckpt

    @classmethod
    def small(cls, **overrides: Any) -> ViltConfig:
        """A tiny configuration for tests and demos (same graph, different sizes)."""
        values: dict[str, Any] = dict(
            vocab_size=30522, hidden_size=64, num_layers=4, num_heads=4, pos_grid=4, drop_rate=0.0
        )
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class KVCache:
    """Keys and values of every token already processed, one entry per layer, plus one additive key bias.

    ``key_bias`` [B, N] is added to the attention logit of each cached key in every layer and head: 0 for a
    normal token, -inf for a padding token, log(Nc) for a token standing for Nc identical ones.
    """

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.key_bias: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.key_bias is None else self.key_bias.shape[1]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.keys[index] is None:
            return None
        return self.keys[index], self.values[index]  # type: ignore[return-value]

    def store(self, index: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep the (cached + new) keys/values a layer returned."""
        self.keys[index] = keys
        self.values[index] = values

    def extend_bias(self, new_key_bias: torch.Tensor) -> None:
        """Append the biases of the tokens just stored (call once per step, after all layers)."""
        self.key_bias = new_key_bias if self.key_bias is None else torch.cat([self.key_bias, new_key_bias], 1)

    def attention_bias(self, new_key_bias: torch.Tensor) -> torch.Tensor:
        """Logit bias [B, 1, 1, N_cached + N_new] for new queries attending to cached + new keys."""
        bias = new_key_bias if self.key_bias is None else torch.cat([self.key_bias, new_key_bias], 1)
        return bias[:, None, None, :]

    def select(self, batch_index: torch.Tensor) -> KVCache:
        """A cache whose batch rows are ``batch_index`` of this one (e.g. one image for many expressions)."""
        out = KVCache(len(self.keys))
        out.keys = [None if k is None else k[batch_index] for k in self.keys]
        out.values = [None if v is None else v[batch_index] for v in self.values]
        out.key_bias = None if self.key_bias is None else self.key_bias[batch_index]
        return out


class BertEmbeddings(nn.Module):
    """Hugging Face ``BertEmbeddings`` as pinned by ViLT (transformers 4.2.1): word + position + token type, LN."""

    def __init__(self, cfg: ViltConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(cfg.max_text_len, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.bert_layer_norm_eps)  # BERT's capitalised name
        self.dropout = nn.Dropout(cfg.drop_rate)
        # persistent under transformers 4.2.1, hence present in the official checkpoint
        self.register_buffer("position_ids", torch.arange(cfg.max_text_len).unsqueeze(0), persistent=True)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        position_ids = self.position_ids[:, :length]
        token_type_ids = torch.zeros_like(input_ids)
        x = (
            self.word_embeddings(input_ids)
            + self.token_type_embeddings(token_type_ids)
            + self.position_embeddings(position_ids)
        )
        return self.dropout(self.LayerNorm(x))


class PatchEmbed(nn.Module):
    """Non-overlapping P x P patches projected by one Conv2d (timm ``PatchEmbed.proj``)."""

    def __init__(self, cfg: ViltConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.proj = nn.Conv2d(3, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, D, H/P, W/P]."""
        return self.proj(pixel_values)

    def embed_flat_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """Project already-cut patches [..., 3*P*P] (channel, row, column order) -> [..., D].

        Same map as the Conv2d, as a matrix product, so only the patches that are kept need computing.
        """
        weight = self.proj.weight.flatten(1)
        return F.linear(patches, weight, self.proj.bias)


class Attention(nn.Module):
    """Multi-head self-attention with fused qkv, an additive logit bias and an optional key/value cache.

    logits = q k^T / sqrt(d_head) + attn_bias;  queries come from ``x`` only; keys/values = cached + new.
    """

    def __init__(self, cfg: ViltConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(cfg.hidden_size, cfg.hidden_size * 3, bias=cfg.qkv_bias)
        self.attn_drop = cfg.drop_rate
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.proj_drop = nn.Dropout(cfg.drop_rate)

    def forward(
        self,
        x: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
        past_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x [B, N, D]; attn_bias broadcastable to [B, heads, N, N_past + N] (additive, -inf = masked).

        Returns the output [B, N, D] and the (past + new) keys/values [B, heads, N_past + N, d_head].
        """
        batch, length, dim = x.shape
        # rows 0..D-1 = q, D..2D-1 = k, 2D..3D-1 = v; head j uses rows j*d_head .. (j+1)*d_head - 1 of each
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if past_key_value is not None:
            k = torch.cat([past_key_value[0], k], dim=2)
            v = torch.cat([past_key_value[1], v], dim=2)
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale
        )
        out = out.transpose(1, 2).reshape(batch, length, dim)
        return self.proj_drop(self.proj(out)), (k, v)


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2, as timm's ViT MLP."""

    def __init__(self, cfg: ViltConfig) -> None:
        super().__init__()
        hidden = cfg.hidden_size * cfg.mlp_ratio
        self.fc1 = nn.Linear(cfg.hidden_size, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, cfg.hidden_size)
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm block: x += attn(norm1(x)); x += mlp(norm2(x))."""

    def __init__(self, cfg: ViltConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg)

    def forward(
        self,
        x: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
        past_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        attn_out, present = self.attn(self.norm1(x), attn_bias, past_key_value)
        x = x + attn_out
        x = x + self.mlp(self.norm2(x))
        return x, present


def interpolate_pos_grid(pos_grid: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """ViLT ``visual_embed``: [1, G*G, D] row-major grid -> [1, D, height, width], bilinear, align_corners=True."""
    grid = int(round(pos_grid.shape[1] ** 0.5))
    spatial = pos_grid.transpose(1, 2).reshape(1, pos_grid.shape[2], grid, grid)
    if (height, width) == (grid, grid):
        return spatial
    return F.interpolate(spatial, size=(height, width), mode="bilinear", align_corners=True)


class VisionTransformer(nn.Module):
    """The ``transformer`` of ViLT: timm ``vit_base_patch32_384`` without its head, shared by text and image."""

    def __init__(self, cfg: ViltConfig) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid * cfg.pos_grid, cfg.hidden_size))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def visual_embed(
        self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ViLT ``visual_embed`` with every patch kept: -> tokens [B, 1 + h*w, D] (class token first), mask.

        ``pixel_mask`` [B, H, W] (1 = real pixel) marks zero padding as ViLT derives it (``pixel_values.sum(1)
        != 0``): it is nearest-resized to the patch grid, positions are interpolated onto each image's valid
        h x w corner and padded patches are masked as keys. Patches come in raster order (index r*w + c);
        ViLT feeds them in a random permutation, which the permutation-equivariant forward does not see.
        """
        patches = self.patch_embed(pixel_values)
        batch, dim, grid_h, grid_w = patches.shape
        if pixel_mask is None:
            pos = interpolate_pos_grid(self.pos_embed[:, 1:], grid_h, grid_w).expand(batch, -1, -1, -1)
            patch_mask = torch.ones(batch, grid_h * grid_w, dtype=torch.long, device=pixel_values.device)
        else:
            mask = F.interpolate(pixel_mask[:, None].float(), size=(grid_h, grid_w)).long()
            valid_h = mask[:, 0].sum(dim=1)[:, 0].tolist()
            valid_w = mask[:, 0].sum(dim=2)[:, 0].tolist()
            pos = torch.cat(
                [
                    F.pad(interpolate_pos_grid(self.pos_embed[:, 1:], h, w), (0, grid_w - w, 0, grid_h - h))
                    for h, w in zip(valid_h, valid_w, strict=True)
                ]
            )
            patch_mask = mask.flatten(1)
        x = patches.flatten(2).transpose(1, 2) + pos.flatten(2).transpose(1, 2)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(batch, -1, -1)
        x = self.pos_drop(torch.cat([cls, x], dim=1))
        mask = torch.cat([torch.ones_like(patch_mask[:, :1]), patch_mask], dim=1)
        return x, mask


class Pooler(nn.Module):
    """tanh(dense(x[:, 0])) - token 0 is the text [CLS]."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


class _PredictionHeadTransform(nn.Module):
    """BERT ``BertPredictionHeadTransform``: dense -> GELU -> LayerNorm (eps 1e-12)."""

    def __init__(self, cfg: ViltConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.transform_act_fn = nn.GELU()
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.bert_layer_norm_eps)  # BERT's capitalised name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(x)))


class MLMHead(nn.Module):
    """ViLT ``heads.MLMHead`` (pre-training only): transform, decoder without bias, separate ``bias``."""

    def __init__(self, cfg: ViltConfig) -> None:
        super().__init__()
        self.transform = _PredictionHeadTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x)) + self.bias


class ITMHead(nn.Module):
    """ViLT ``heads.ITMHead`` (pre-training only): image-text match logits from the pooled feature."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.fc = nn.Linear(hidden_size, 2)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(pooled)


class ViltModel(nn.Module):
    """ViLT ``ViLTransformerSS`` (the ``infer`` path) with the official parameter names."""

    def __init__(self, cfg: ViltConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or ViltConfig()
        self.text_embeddings = BertEmbeddings(self.cfg)
        self.token_type_embeddings = nn.Embedding(2, self.cfg.hidden_size)  # modality: 0 = text, 1 = image
        self.transformer = VisionTransformer(self.cfg)
        if self.cfg.with_pooler:
            self.pooler = Pooler(self.cfg.hidden_size)
        if self.cfg.with_pretrain_heads:
            self.mlm_score = MLMHead(self.cfg)
            self.itm_score = ITMHead(self.cfg.hidden_size)

    def embed_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """BERT embeddings + modality type 0 -> [B, L, D]."""
        x = self.text_embeddings(text_ids)
        return x + self.token_type_embeddings.weight[0]

    def embed_image(
        self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch + position embeddings + modality type 1 -> tokens [B, 1 + h*w, D], mask [B, 1 + h*w]."""
        x, mask = self.transformer.visual_embed(pixel_values, pixel_mask)
        return x + self.token_type_embeddings.weight[1], mask

    def forward(
        self,
        text_ids: torch.Tensor,
        text_masks: torch.Tensor,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """ViLT ``infer`` with every patch kept: [text | image cls | patches] through the 12 blocks."""
        text = self.embed_text(text_ids)
        image, image_mask = self.embed_image(pixel_values, pixel_mask)
        co_embeds = torch.cat([text, image], dim=1)
        co_masks = torch.cat([text_masks.to(image_mask.dtype), image_mask], dim=1)
        key_bias = torch.zeros(co_masks.shape, dtype=co_embeds.dtype, device=co_embeds.device)
        key_bias = key_bias.masked_fill(co_masks == 0, float("-inf"))[:, None, None, :]
        x = co_embeds
        for block in self.transformer.blocks:
            x, _ = block(x, key_bias)
        x = self.transformer.norm(x)
        out = {
            "co_embeds": co_embeds,
            "text_feats": x[:, : text.shape[1]],
            "image_feats": x[:, text.shape[1] :],
            "image_masks": image_mask,
            "raw_cls_feats": x[:, 0],
        }
        if self.cfg.with_pooler:
            out["pooled"] = self.pooler(x)
        return out


def checkpoint_filter_fn(state_dict: dict[str, Any], model: ViltModel | None = None) -> dict[str, torch.Tensor]:
    """Map a ViLT checkpoint onto :class:`ViltModel` names.

    Accepts the official Lightning file's dict (weights under ``state_dict``) or a bare state dict; removes a
    ``module.`` prefix; drops the pre-training heads when ``model`` has none.
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    out: dict[str, torch.Tensor] = {}
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue
        if name.startswith("module."):
            name = name[len("module.") :]
        if model is not None:
            if name.startswith(("mlm_score.", "itm_score.")) and not model.cfg.with_pretrain_heads:
                continue
            if name.startswith("pooler.") and not model.cfg.with_pooler:
                continue
        out[name] = value
    return out
