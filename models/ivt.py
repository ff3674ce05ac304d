"""IVT: "See Finer, See More: Implicit Modality Alignment for Text-based Person Retrieval" (ECCVW 2022).

Reimplementation of the official PersonRetrieval-IVT model ``build_transformer_uvt_img_txt_mask`` and its
encoder ``UVT_Bert_IMG_TXT_MASK``. One 12-layer pre-norm ViT-B transformer serves both modalities
(paper Sec. 3.2): every block shares ``norm1``, the self-attention and ``norm2`` across modalities and has
two feed-forward experts, ``mlp_vis`` for image tokens and ``mlp_txt`` for text tokens. The embedding of
either modality is the CLS token after the shared final LayerNorm (768-d, no projection).

- Image: overlapping 16x16 patches (stride 12 for the CUHK-PEDES / ICFG-PEDES weights, 16 for RSTPReid)
  of a 384x128 image, ``[cls; patches] + pos_embed + type_embed``.
- Text: BERT-base-uncased word + token-type(0) + position embeddings, LayerNorm(eps 1e-12); the official
  tokenizer emits ``[CLS] + word pieces`` with NO ``[SEP]`` and never truncates.
- Loss: CMPM (paper Eq. for L_cmpm) exactly as the official code normalises its target (``cmpm_loss``).

State-dict names follow the official checkpoint files (``keys-*.tsv`` of the parity fixtures), including
the heads the fine-tuned model never uses (``temp``, ``classifier_img``, ``bottleneck_img``) so that
official files load with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
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
from models.tokenizers import bert_tokenizer

# ----------------------------------------------------------------------------------------------- constants

IMAGE_SIZE: tuple[int, int] = (384, 128)  # (height, width) of the official test transform
IMAGE_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
IMAGE_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
CLS_TOKEN_ID = 101  # [CLS] of the bert-base-uncased vocabulary
PAD_TOKEN_ID = 0  # [PAD]
ATTENTION_MASK_FILL = -10000.0  # official additive key-padding bias: (1 - mask) * -10000
SUPPORTED_STRIDES: tuple[int, ...] = (12, 16)  # the strides the official training scripts use

# The official path never truncates a caption (``max_length=100`` is passed but inert). The service caps
# a query at SERVICE_MAX_TEXT_TOKENS tokens *including* [CLS]: longer queries keep [CLS] and their first
# SERVICE_MAX_TEXT_TOKENS - 1 word pieces (the tail is dropped, even mid-word). 512 is the size of the BERT
# position table, i.e. the longest text the official model can encode at all, so every caption the official
# code accepts is encoded exactly as officially; only texts it would crash on are shortened.
SERVICE_MAX_TEXT_TOKENS = 512


# ----------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class IVTConfig:
    """Settings of ``vit_base_patch16_224_uvt_img_txt_mask`` as the IVT fine-tuning scripts build it."""

    image_size: tuple[int, int] = IMAGE_SIZE
    patch_size: int = 16
    stride: int = 12
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_hidden_dim: int = 3072
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    num_classes: int = 11003  # size of the unused classifier_img head (CUHK-PEDES train identities)
    layer_norm_eps: float = 1e-6
    text_layer_norm_eps: float = 1e-12
    drop_path_rate: float = 0.1  # training only
    text_dropout: float = 0.1  # BERT hidden_dropout_prob, training only
    temp_init: float = 0.5  # cfg.MODEL.TEMP, the unused ``temp`` scalar

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, columns) of the overlapping patch embedding."""
        height, width = self.image_size
        return ((height - self.patch_size) // self.stride + 1, (width - self.patch_size) // self.stride + 1)

    @property
    def num_image_tokens(self) -> int:
        rows, cols = self.grid
        return rows * cols + 1


def config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], image_size: tuple[int, int] = IMAGE_SIZE
) -> IVTConfig:
    """Read an ``IVTConfig`` off an official state_dict (``module.`` already stripped).

    The stride is the one whose patch grid on ``image_size`` gives the position table's token count
    (311 -> stride 12, 193 -> stride 16 at 384x128; the official strides 12 and 16 are tried first); the
    number of classes comes from ``classifier_img``. The head count is not recorded in a file: heads are
    64 wide, as in ViT-B (12 heads at width 768).
    """
    required = ("encoder_vl.pos_embed", "encoder_vl.cls_token", "encoder_vl.patch_embed.proj.weight",
                "encoder_vl.embeddings.position_embeddings.weight", "classifier_img.weight",
                "encoder_vl.embeddings.word_embeddings.weight", "encoder_vl.blocks.0.mlp_vis.fc1.weight")
    absent = [k for k in required if k not in state_dict]
    if absent:
        raise ValueError(f"not an IVT state_dict: missing {absent}")
    num_tokens = int(state_dict["encoder_vl.pos_embed"].shape[1])
    patch_size = int(state_dict["encoder_vl.patch_embed.proj.weight"].shape[-1])
    depth = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("encoder_vl.blocks."))
    embed_dim = int(state_dict["encoder_vl.cls_token"].shape[-1])
    base = IVTConfig(
        image_size=tuple(image_size),  # type: ignore[arg-type]
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // 64,
        mlp_hidden_dim=int(state_dict["encoder_vl.blocks.0.mlp_vis.fc1.weight"].shape[0]),
        vocab_size=int(state_dict["encoder_vl.embeddings.word_embeddings.weight"].shape[0]),
        max_position_embeddings=int(state_dict["encoder_vl.embeddings.position_embeddings.weight"].shape[0]),
        num_classes=int(state_dict["classifier_img.weight"].shape[0]),
    )
    def strides_giving(candidates: Iterable[int]) -> list[int]:
        return [s for s in candidates if _replace(base, stride=s).num_image_tokens == num_tokens]

    # The official strides first; any other stride only when it is the single one that fits.
    matches = strides_giving(SUPPORTED_STRIDES) or strides_giving(range(1, patch_size + 1))
    if len(matches) != 1:
        raise ValueError(
            f"cannot tell the patch stride: pos_embed has {num_tokens} tokens, which "
            f"{'no' if not matches else 'more than one'} stride gives at image size {tuple(image_size)}"
        )
    return _replace(base, stride=matches[0])


def _replace(config: IVTConfig, **changes: Any) -> IVTConfig:
    return IVTConfig(**{**asdict(config), **changes})


# ----------------------------------------------------------------------------------------------- modules


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (official blocks use timm's DropPath, rates linspace(0, 0.1, depth))."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class TextEmbeddings(nn.Module):
    """BERT embeddings (official ``BertEmbeddings`` of ALBEF's xbert), used for the text modality only.

    ``word[ids] + token_type[0] + position[0..L-1]`` -> LayerNorm(eps 1e-12) -> dropout. The tokenizer's
    ``token_type_ids`` are never passed officially, so type 0 is always used.
    """

    def __init__(self, config: IVTConfig):
        super().__init__()
        # ``position_ids`` is a persistent buffer in the official files (newer HF registers it non-persistent).
        self.register_buffer(
            "position_ids", torch.arange(config.max_position_embeddings).unsqueeze(0), persistent=True
        )
        self.word_embeddings = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=PAD_TOKEN_ID)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.embed_dim)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.embed_dim)
        self.LayerNorm = nn.LayerNorm(config.embed_dim, eps=config.text_layer_norm_eps)  # BERT's name
        self.dropout = nn.Dropout(config.text_dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.position_ids.shape[1]:
            raise ValueError(
                f"text of {length} tokens exceeds the {self.position_ids.shape[1]}-entry position table"
            )
        token_types = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_types)
        x = x + self.position_embeddings(self.position_ids[:, :length])
        return self.dropout(self.LayerNorm(x))


class OverlapPatchEmbed(nn.Module):
    """Official ``PatchEmbed_overlap``: Conv2d(k=16, stride=S), flattened row-major (rows then columns)."""

    def __init__(self, config: IVTConfig):
        super().__init__()
        self.image_size = config.image_size
        self.proj = nn.Conv2d(3, config.embed_dim, kernel_size=config.patch_size, stride=config.stride)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if tuple(pixel_values.shape[-2:]) != tuple(self.image_size):
            raise ValueError(f"expected images of size {self.image_size}, got {tuple(pixel_values.shape[-2:])}")
        return self.proj(pixel_values).flatten(2).transpose(1, 2)


class MaskedSelfAttention(nn.Module):
    """Official ``AttentionMask``: fused qkv (with bias), scale 1/sqrt(64), optional additive key bias."""

    def __init__(self, config: IVTConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.embed_dim // config.num_heads
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim, bias=True)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = None if key_bias is None else key_bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.head_dim**-0.5)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2, one modality expert."""

    def __init__(self, config: IVTConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.embed_dim, config.mlp_hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.mlp_hidden_dim, config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisTxtBlock(nn.Module):
    """Official ``BlockVisTxt`` (paper Sec. 3.2): shared LN + MSA + LN, modality-specific FFN expert.

    ``x = x + MSA(LN1(x)); x = x + FFN_m(LN2(x))`` with m = ``mlp_vis`` for images, ``mlp_txt`` for text.
    """

    def __init__(self, config: IVTConfig, drop_path_rate: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.attn = MaskedSelfAttention(config)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.mlp_vis = Mlp(config)
        self.mlp_txt = Mlp(config)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor, is_image: bool, key_bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x), key_bias), self.drop_path_rate, self.training)
        expert = self.mlp_vis if is_image else self.mlp_txt
        return x + drop_path(expert(self.norm2(x)), self.drop_path_rate, self.training)


class IVTEncoder(nn.Module):
    """Official ``UVT_Bert_IMG_TXT_MASK`` (``encoder_vl``), the one transformer shared by both modalities.

    Returns the CLS token after the shared final LayerNorm. BMM token dropping (training only in the
    official code) is not part of this inference encoder.
    """

    def __init__(self, config: IVTConfig):
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.patch_embed = OverlapPatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_image_tokens, config.embed_dim))
        # A learned per-position "image modality" embedding, added to the image sequence only.
        self.type_embed = nn.Parameter(torch.zeros(1, config.num_image_tokens, config.embed_dim))
        self.pos_drop = nn.Dropout(0.0)
        rates = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]  # linspace
        self.blocks = nn.ModuleList([VisTxtBlock(config, rate) for rate in rates])
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        for parameter in (self.cls_token, self.pos_embed, self.type_embed):
            nn.init.trunc_normal_(parameter, std=0.02)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] normalised pixels -> [B, D] CLS features (raw, not L2-normalised)."""
        patches = self.patch_embed(pixel_values)
        cls = self.cls_token.expand(patches.shape[0], -1, -1).to(patches.dtype)
        x = self.pos_drop(torch.cat([cls, patches], dim=1) + self.pos_embed + self.type_embed)
        for block in self.blocks:
            x = block(x, is_image=True)
        return self.norm(x[:, 0])  # LayerNorm is per token: normalising token 0 alone is the same

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L] ids ([CLS] first, 0-padded) and 0/1 mask -> [B, D] CLS features (raw)."""
        x = self.embeddings(input_ids)
        key_bias = None
        if attention_mask is not None:
            key_bias = (1.0 - attention_mask.to(x.dtype))[:, None, None, :] * ATTENTION_MASK_FILL
        for block in self.blocks:
            x = block(x, is_image=False, key_bias=key_bias)
        return self.norm(x[:, 0])


class IVT(nn.Module):
    """Official ``build_transformer_uvt_img_txt_mask``: the shared encoder plus heads kept only for loading."""

    def __init__(self, config: IVTConfig | None = None):
        super().__init__()
        self.config = config or IVTConfig()
        self.temp = nn.Parameter(torch.ones([]) * self.config.temp_init)  # unused after pre-training
        self.encoder_vl = IVTEncoder(self.config)
        self.classifier_img = nn.Linear(self.config.embed_dim, self.config.num_classes, bias=False)  # unused
        self.bottleneck_img = nn.BatchNorm1d(self.config.embed_dim)  # unused
        self.bottleneck_img.bias.requires_grad_(False)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encoder_vl.encode_image(pixel_values)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder_vl.encode_text(input_ids, attention_mask)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out_vis, out_txt)``: raw CLS features, as the official forward returns in train and eval."""
        return self.encode_image(pixel_values), self.encode_text(input_ids, attention_mask)


# ----------------------------------------------------------------------------------------------- loss


def cmpm_loss(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, labels: torch.Tensor, epsilon: float = 1e-8
) -> torch.Tensor:
    """Cross-modal projection matching loss (paper Sec. 3.4), normalised as official ``loss/cmps_loss.py``.

    Raw features are projected on the other side's unit vectors: ``l_i2t = v @ t_hat^T``,
    ``l_t2i = t @ v_hat^T`` (no temperature). The target is ``q = M / ||M||_2`` with ``M_ij = [y_i == y_j]``,
    where the official code divides by the row-norm vector broadcast over the LAST dim (``q_ij = M_ij /
    sqrt(n_j)``, equal to ``1/sqrt(n_i)`` on the positives): an L2-, not the paper's L1-normalised target.
    ``L = mean_i sum_j p_ij (log p_ij - log(q_ij + eps))`` per direction, summed over both directions.
    """
    labels = labels.reshape(-1, 1)
    positives = (labels - labels.t() == 0).float()
    target = positives / positives.norm(dim=1)  # broadcast over the last dim, as officially
    log_target = torch.log(target + epsilon)
    image_unit = image_embeddings / image_embeddings.norm(dim=1, keepdim=True)
    text_unit = text_embeddings / text_embeddings.norm(dim=1, keepdim=True)
    total = image_embeddings.new_zeros(())
    for logits in (image_embeddings @ text_unit.t(), text_embeddings @ image_unit.t()):
        kl = F.softmax(logits, dim=1) * (F.log_softmax(logits, dim=1) - log_target)
        total = total + kl.sum(dim=1).mean()
    return total


# ----------------------------------------------------------------------------------------------- preprocessing


def preprocess_image(image: Image.Image, image_size: tuple[int, int] = IMAGE_SIZE) -> torch.Tensor:
    """Official test transform: RGB, PIL bilinear resize to (H, W), /255, (x - 0.5) / 0.5 -> [3, H, W].

    PIL's bilinear filter widens its support when downscaling (it is antialiased); only PIL reproduces
    the official pixels bit for bit.
    """
    height, width = image_size
    resized = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(resized, dtype=np.float32) / np.float32(255.0)
    array = (array - np.asarray(IMAGE_MEAN, np.float32)) / np.asarray(IMAGE_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def tokenize_captions(
    texts: Sequence[str], max_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Official ALBEF-style tokenisation: lower-cased WordPiece, ``[CLS] + pieces`` with NO ``[SEP]``.

    Right-padded with ``[PAD]`` = 0 to the longest caption; ``attention_mask`` is 1 on real tokens.
    ``max_tokens=None`` is the official path (no truncation). With ``max_tokens`` (the service passes
    ``SERVICE_MAX_TEXT_TOKENS``) a caption keeps [CLS] and its first ``max_tokens - 1`` word pieces.
    """
    if max_tokens is not None and max_tokens < 1:
        raise ValueError("max_tokens must count at least the [CLS] token")
    pieces = bert_tokenizer()(list(texts), add_special_tokens=False)["input_ids"]
    sequences = [[CLS_TOKEN_ID, *ids] for ids in pieces]
    if max_tokens is not None:
        sequences = [seq[:max_tokens] for seq in sequences]
    length = max((len(seq) for seq in sequences), default=1)
    input_ids = torch.full((len(sequences), length), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


# ----------------------------------------------------------------------------------------------- checkpoints


class IVTCheckpointError(ValueError):
    """A file that is not an IVT checkpoint (unreadable, or holds no IVT state_dict)."""


def checkpoint_filter_fn(checkpoint: Any) -> dict[str, torch.Tensor]:
    """Map an official IVT file onto this model's state_dict layout.

    Official files are ``{'state_dict', 'optimizer', 'epoch', 'best_acc'}``; under DDP every key carries a
    leading ``module.`` (the official test path strips it). The names are otherwise identical.
    """
    try:
        state_dict = find_state_dict(checkpoint, candidates=("state_dict", "model"))
    except ValueError as exc:
        raise IVTCheckpointError(f"no IVT state_dict in the file: {exc}") from exc
    return strip_prefix(state_dict, "module.")


def load_ivt_checkpoint(path: str | Path, image_size: tuple[int, int] | None = None) -> IVT:
    """Build an ``IVT`` sized from an official file and load it strictly.

    The file is read with ``torch.load(weights_only=True)`` and an explicit allow-list (the official
    ``best_acc`` is a numpy float64); legacy non-zip files, as the official ``save_checkpoint`` writes, work.
    ``image_size`` (H, W) defaults to the file's own ``image_size`` entry (our training recipe writes one;
    official files have none) and then to the official 384x128; a ``num_heads`` entry (also ours) overrides
    the official width // 64 head count.
    """
    path = Path(path)
    try:
        checkpoint = load_checkpoint_file(path)
    except ValueError as exc:
        raise IVTCheckpointError(f"{path.name} is not a readable IVT checkpoint: {exc}") from exc
    state_dict = checkpoint_filter_fn(checkpoint)
    if image_size is None:
        stored = checkpoint.get("image_size") if isinstance(checkpoint, Mapping) else None
        image_size = (int(stored[0]), int(stored[1])) if stored is not None else IMAGE_SIZE
    try:
        config = config_from_state_dict(state_dict, image_size)
    except ValueError as exc:
        raise IVTCheckpointError(f"{path.name}: {exc}") from exc
    stored_heads = checkpoint.get("num_heads") if isinstance(checkpoint, Mapping) else None
    if stored_heads is not None:  # our training recipe writes it; official files follow width // 64
        config = _replace(config, num_heads=int(stored_heads))
    model = IVT(config)
    load_state_dict_strict(model, state_dict, source=path.name)
    return model.eval()


# ----------------------------------------------------------------------------------------------- service adapter


def autocast_context(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    """The context an encode runs under: none for fp32 / official (official inference is fp32), else autocast."""
    if precision in ("fp32", "official"):
        return nullcontext()
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    raise ValueError(f"precision {precision!r} is not supported for IVT on {device.type}")


def cast_matmul_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store Linear/Conv2d weights and biases in ``dtype`` once, in place.

    Autocast runs these layers in ``dtype`` and casts fp32 weights on every call (all 86M per image at batch
    1); casting them once gives bit-identical outputs under autocast without that per-call copy. Norms and
    embeddings stay fp32, as autocast keeps them.
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.to(dtype)
    return model


def _chunks(indices: Sequence[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(indices), size):
        yield list(indices[start : start + size])


class IVTRetrievalModel:
    """``RetrievalModel`` for the service: images and texts -> L2-normalised 768-d float32 features.

    ``precision``: ``fp32`` / ``official`` (the official inference is fp32), ``bf16`` (autocast on CPU or
    GPU) or ``fp16`` (autocast, GPU only); for bf16/fp16 the adapter stores its model's Linear/Conv weights
    in that dtype once (``cast_matmul_weights``, same outputs as plain autocast). Texts are capped at
    ``max_text_tokens`` (see ``SERVICE_MAX_TEXT_TOKENS``); within one call they are encoded in length order
    to save padding (features are padding-invariant).
    """

    method = "ivt"

    def __init__(
        self,
        model: IVT,
        version: str,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        batch_size: int = 16,
        max_text_tokens: int = SERVICE_MAX_TEXT_TOKENS,
    ):
        self.device = torch.device(device)
        autocast_context(self.device, precision)  # reject an unsupported precision now, not at the first request
        self.model = model.to(self.device).eval()
        if precision in ("bf16", "fp16"):  # same numbers as autocast over fp32 weights, without re-casting
            cast_matmul_weights(self.model, torch.bfloat16 if precision == "bf16" else torch.float16)
        self.config = model.config
        self.precision = precision
        self.batch_size = batch_size
        self.max_text_tokens = min(max_text_tokens, self.config.max_position_embeddings)
        self.version = version
        self.embed_dim = self.config.embed_dim

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        image_size: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> IVTRetrievalModel:
        """Load an official (or our own) IVT file; ``version`` = stride + the file's content hash.

        ``image_size`` as in ``load_ivt_checkpoint`` (the file's own entry, else 384x128)."""
        model = load_ivt_checkpoint(path, image_size)
        version = f"ivt-s{model.config.stride}-{file_version(path)}"
        return cls(model, version, device, precision, **kwargs)

    @classmethod
    def from_config(
        cls,
        config: IVTConfig | None = None,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        seed: int = 0,
        **kwargs: Any,
    ) -> IVTRetrievalModel:
        """A randomly initialised model (seeded), for tests and demos without official weights."""
        config = config or IVTConfig()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = IVT(config)
        return cls(model, f"ivt-s{config.stride}-random{seed}", device, precision, **kwargs)

    @torch.inference_mode()
    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        outputs = np.zeros((len(images), self.embed_dim), dtype=np.float32)
        for rows in _chunks(range(len(images)), self.batch_size):
            pixels = torch.stack([preprocess_image(images[i], self.config.image_size) for i in rows])
            with autocast_context(self.device, self.precision):
                features = self.model.encode_image(pixels.to(self.device))
            outputs[rows] = F.normalize(features.float(), dim=-1).cpu().numpy()
        return outputs

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        outputs = np.zeros((len(texts), self.embed_dim), dtype=np.float32)
        if not texts:
            return outputs
        input_ids, attention_mask = tokenize_captions(texts, max_tokens=self.max_text_tokens)
        lengths = attention_mask.sum(dim=1)
        order = torch.argsort(lengths, descending=True, stable=True).tolist()
        for rows in _chunks(order, self.batch_size):
            length = int(lengths[rows].max())
            ids = input_ids[rows, :length].to(self.device)
            mask = attention_mask[rows, :length].to(self.device)
            with autocast_context(self.device, self.precision):
                features = self.model.encode_text(ids, mask)
            outputs[rows] = F.normalize(features.float(), dim=-1).cpu().numpy()
        return outputs
