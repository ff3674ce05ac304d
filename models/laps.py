"""LAPS: Linguistic-Aware Patch Slimming (Fu et al., CVPR 2024) as the released code computes it.

Official code: CrossmodalGroup/LAPS @ 355a43b (``lib/vse.py``, ``lib/encoders.py``, ``lib/cross_net.py``).
The released checkpoints were trained by that code, which is simpler than the paper (research notes 2.6):
parameter-free patch scores ``cos(patch, mean patch) + cos(patch, mean word)``, a hard top-K with
K = ceil(N * sparse_ratio), a learned aggregation of the kept patches into Nc tokens, one fused token for the
dropped ones and a LeakyReLU(0.1) max-mean matching (summed over both directions). The paper's significance
network, beta weighting and Gumbel-softmax decision exist here as ``selection="paper"`` (extra parameters only
then), so released checkpoints load and score unchanged.

Layout of the official ``VSEModel`` (state-dict names follow it):
``img_enc.visual_encoder`` (HF ViTModel / SwinModel) + ``img_enc.vision_proj``; ``txt_enc.bert`` (HF BertModel)
+ ``txt_enc.fc``; ``cross_net.aggr_net.weight.{0,1,3}`` (LayerNorm, Linear, -, Linear) + ``cross_net.aggr_net.scale``.
Checkpoints carry transformers-4.x backbone names; transformers 5.x renamed the ViT/Swin submodules, which
:func:`checkpoint_filter_fn` maps (and :func:`to_official_state_dict` maps back).

The service adapter :class:`LapsSearchModel` sits at the end of this file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torch import Tensor
from transformers import BertConfig, BertModel, SwinConfig, SwinModel, ViTConfig, ViTModel

from models.checkpoint import (
    file_version,
    find_state_dict,
    load_checkpoint_file,
    load_state_dict_strict,
    strip_prefix,
)
from models.laps_scoring import (
    LapsCaptionState,
    LapsImageState,
    PaperSelection,
    candidate_caption_vectors,
    candidate_image_vectors,
    has_cls_token,
    num_aggregated_tokens,
    num_kept_patches,
    score_block,
    score_matrix,
)
from models.tokenizers import bert_tokenizer

# --------------------------------------------------------------------------------------------- constants

IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # lib/image_caption.py build_transforms (used for ViT and Swin alike)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_WORD = 90  # arguments.py --max_word: encode_data keeps the first 90 word features of a caption
BERT_MAX_POSITIONS = 512
PAD_ID = 0

# google/vit-base-patch16-224-in21k and microsoft/swin-base-patch4-window7-224, as HF configs
VIT_BASE_224: dict[str, Any] = {"image_size": 224, "patch_size": 16}
SWIN_BASE_224: dict[str, Any] = {
    "image_size": 224, "patch_size": 4, "embed_dim": 128, "depths": [2, 2, 18, 2],
    "num_heads": [4, 8, 16, 32], "window_size": 7,
}


@dataclass
class LapsConfig:
    """Model settings. The official ones come from the checkpoint's ``opt`` (:meth:`from_options`).

    ``vision`` / ``text`` override the HF backbone configs (small models for tests and demos); empty means the
    released backbones (ViT-B/16-224 in21k or Swin-B-224, BERT-base-uncased).
    """

    backbone: str = "vit"  # "vit" | "swin" (official --vit_type; any name containing "swin" is Swin)
    embed_size: int = 512
    sparse_ratio: float = 0.5
    aggr_ratio: float = 0.4
    max_word: int = MAX_WORD
    selection: str = "official"  # "official" (released code) | "paper" (significance net + Gumbel-softmax)
    paper_beta: float = 0.25
    gumbel_tau: float = 1.0
    margin: float = 0.2
    ratio_weight: float = 2.0
    vision: dict[str, Any] = field(default_factory=dict)
    text: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backbone not in ("vit", "swin"):
            raise ValueError(f"backbone must be 'vit' or 'swin', not {self.backbone!r}")
        if self.selection not in ("official", "paper"):
            raise ValueError(f"selection must be 'official' or 'paper', not {self.selection!r}")
        if not 0.0 < self.sparse_ratio <= 1.0:
            raise ValueError("sparse_ratio must be in (0, 1]")

    @classmethod
    def released(cls, backbone: str = "vit") -> LapsConfig:
        """The README configurations: ViT (rho 0.5, aggr 0.4) and Swin (rho 0.8, aggr 0.6), embed 512."""
        if backbone == "swin":
            return cls(backbone="swin", sparse_ratio=0.8, aggr_ratio=0.6)
        return cls(backbone="vit", sparse_ratio=0.5, aggr_ratio=0.4)

    @classmethod
    def from_options(cls, opt: argparse.Namespace | Mapping[str, Any]) -> LapsConfig:
        """Read an official ``checkpoint['opt']`` (argparse Namespace) or a dict of the same names."""
        get = (lambda k, d: opt.get(k, d)) if isinstance(opt, Mapping) else (lambda k, d: getattr(opt, k, d))
        vit_type = str(get("vit_type", "vit"))
        return cls(
            backbone="swin" if "swin" in vit_type else "vit",
            embed_size=int(get("embed_size", 512)),
            sparse_ratio=float(get("sparse_ratio", 0.5)),
            aggr_ratio=float(get("aggr_ratio", 0.4)),
            max_word=int(get("max_word", MAX_WORD)),
            selection=str(get("laps_selection", "official")),
            paper_beta=float(get("laps_paper_beta", 0.25)),
            gumbel_tau=float(get("laps_gumbel_tau", 1.0)),
            margin=float(get("margin", 0.2)),
            ratio_weight=float(get("ratio_weight", 2.0)),
            vision=dict(get("laps_vision_config", {}) or {}),
            text=dict(get("laps_text_config", {}) or {}),
        )

    def to_options(self, **extra: Any) -> argparse.Namespace:
        """An official-style ``opt`` Namespace; non-official settings use ``laps_*`` names the official code ignores."""
        opt = argparse.Namespace(
            vit_type=self.backbone, embed_size=self.embed_size, sparse_ratio=self.sparse_ratio,
            aggr_ratio=self.aggr_ratio, max_word=self.max_word, margin=self.margin, ratio_weight=self.ratio_weight,
            attention_weight=0.8, img_res=IMAGE_SIZE, num_patches=self.num_patches,
            laps_selection=self.selection, laps_paper_beta=self.paper_beta, laps_gumbel_tau=self.gumbel_tau,
            laps_vision_config=dict(self.vision), laps_text_config=dict(self.text),
        )
        for key, value in extra.items():
            setattr(opt, key, value)
        return opt

    # -- derived sizes
    def vision_config(self) -> ViTConfig | SwinConfig:
        if self.backbone == "swin":
            return SwinConfig(**{**SWIN_BASE_224, **self.vision})
        return ViTConfig(**{**VIT_BASE_224, **self.vision})

    def text_config(self) -> BertConfig:
        return BertConfig(**self.text)

    @property
    def num_patches(self) -> int:
        """Spatial tokens of the backbone output: (224/16)^2 = 196 (ViT), (224/4/2^3)^2 = 49 (Swin)."""
        vc = self.vision_config()
        if self.backbone == "swin":
            side = vc.image_size // vc.patch_size // 2 ** (len(vc.depths) - 1)
        else:
            side = vc.image_size // vc.patch_size
        return int(side * side)

    @property
    def image_size(self) -> int:
        return int(self.vision_config().image_size)

    @property
    def keep_k(self) -> int:
        return num_kept_patches(self.num_patches, self.sparse_ratio)

    @property
    def num_aggregated(self) -> int:
        return num_aggregated_tokens(self.num_patches, self.aggr_ratio, self.sparse_ratio)


# --------------------------------------------------------------------------------------------- preprocessing


def preprocess_image(image: Image.Image, size: int = IMAGE_SIZE) -> Tensor:
    """Official eval transform: RGB, PIL bicubic squash to size x size (no crop), /255, ImageNet mean/std."""
    image = image.convert("RGB").resize((size, size), Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    pixels = (pixels - mean) / std
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def preprocess_images(images: Sequence[Image.Image], size: int = IMAGE_SIZE) -> Tensor:
    return torch.stack([preprocess_image(img, size) for img in images]) if images else torch.empty(0, 3, size, size)


def tokenize_caption(text: str) -> list[int]:
    """``[CLS] wordpieces [SEP]`` of bert-base-uncased, no truncation (``process_caption_bert``, train=False).

    Only a caption longer than BERT's 512 positions is cut (the official code would fail on it).
    """
    ids = list(bert_tokenizer()(text, add_special_tokens=True)["input_ids"])
    if len(ids) > BERT_MAX_POSITIONS:
        ids = ids[: BERT_MAX_POSITIONS - 1] + [ids[-1]]
    return ids


def tokenize_captions(texts: Sequence[str]) -> list[list[int]]:
    return [tokenize_caption(t) for t in texts]


def collate_captions(token_ids: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor, list[int]]:
    """``collate_fn_ours``: sort by length (descending, stable), zero-pad. Returns ids, lengths, original order."""
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]), reverse=True)
    return pad_token_ids([token_ids[i] for i in order]) + (order,)


def pad_token_ids(token_ids: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Zero-padded ids [B, L] (input order kept) and their lengths."""
    lengths = torch.tensor([len(t) for t in token_ids], dtype=torch.long)
    ids = torch.full((len(token_ids), int(lengths.max()) if len(token_ids) else 0), PAD_ID, dtype=torch.long)
    for row, tokens in enumerate(token_ids):
        ids[row, : len(tokens)] = torch.tensor(list(tokens), dtype=torch.long)
    return ids, lengths


# --------------------------------------------------------------------------------------------- modules


class LapsImageEncoder(nn.Module):
    """``lib/encoders.py: VisionTransEncoder``: HF ViT/Swin ``last_hidden_state`` -> ``vision_proj``."""

    def __init__(self, config: LapsConfig):
        super().__init__()
        vision_config = config.vision_config()
        if config.backbone == "swin":
            self.visual_encoder = SwinModel(vision_config, add_pooling_layer=True)
        else:
            self.visual_encoder = ViTModel(vision_config, add_pooling_layer=True)  # pooler unused, still saved
        width = int(vision_config.hidden_size)
        # official: Identity when embed_size equals the backbone width (no state-dict keys then)
        self.vision_proj = nn.Identity() if config.embed_size == width else nn.Linear(width, config.embed_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """[B, 3, 224, 224] -> [B, L_v, C]: ViT 197 tokens (CLS first), Swin 49 tokens (no CLS)."""
        hidden = self.visual_encoder(pixel_values=pixel_values).last_hidden_state
        return self.vision_proj(hidden)


class LapsTextEncoder(nn.Module):
    """``lib/encoders.py: EncoderText_BERT``: BERT last hidden state -> ``fc``; attention mask = ids != 0."""

    def __init__(self, config: LapsConfig):
        super().__init__()
        text_config = config.text_config()
        self.bert = BertModel(text_config, add_pooling_layer=True)  # pooler unused, still saved
        width = int(text_config.hidden_size)
        self.fc = nn.Identity() if config.embed_size == width else nn.Linear(width, config.embed_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        """[B, L] zero-padded ids -> [B, L, C] (rows past a caption's length are BERT's outputs at [PAD])."""
        attention_mask = (input_ids != PAD_ID).float()
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.fc(hidden)


class TokenAggregation(nn.Module):
    """``TokenAggregation``: softmax(scale * MLP(x)) over the kept patches, one weight column per output token."""

    def __init__(self, dim: int, num_out: int, dim_ratio: float = 0.2):
        super().__init__()
        hidden = int(dim * dim_ratio)
        # named `weight` in the official code: the MLP that produces the aggregation weights
        self.weight = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, num_out))
        self.scale = nn.Parameter(torch.ones(1, 1, 1))

    def logits(self, tokens: Tensor) -> Tensor:
        """Token-wise ``scale * MLP(tokens)`` [..., N, Nc]: the pre-softmax aggregation weights."""
        return self.weight(tokens) * self.scale.reshape(())

    def forward(self, tokens: Tensor) -> Tensor:
        """[B, K, C] kept patches -> [B, Nc, C] aggregated patches (softmax over K per output slot)."""
        weights = self.logits(tokens).transpose(1, 2).softmax(dim=-1)
        return torch.bmm(weights, tokens)


class PatchSignificanceNet(nn.Module):
    """Paper variant only: the significance-score network ``s^p_k = sigmoid(MLP(v_k))`` per patch.

    From the paper's "Significance Score Estimation" (the released code has none; research notes 2.6, where the
    paper text itself is marked unverified). Its parameters exist only when ``selection == "paper"``.
    """

    def __init__(self, dim: int, dim_ratio: float = 0.25):
        super().__init__()
        hidden = max(1, int(dim * dim_ratio))
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, tokens: Tensor) -> Tensor:
        return torch.sigmoid(self.mlp(tokens)).squeeze(-1)


class CrossSparseAggrNet(nn.Module):
    """``CrossSparseAggrNet_v2``: text-conditioned patch selection, aggregation, fusion and matching."""

    def __init__(self, config: LapsConfig, num_patches: int):
        super().__init__()
        self.num_patches = num_patches
        self.sparse_ratio = config.sparse_ratio
        self.keep_k = num_kept_patches(num_patches, config.sparse_ratio)
        self.num_aggregated = num_aggregated_tokens(num_patches, config.aggr_ratio, config.sparse_ratio)
        self.max_word = config.max_word
        self.selection = config.selection
        self.aggr_net = TokenAggregation(config.embed_size, self.num_aggregated)
        self.paper = PaperSelection(beta=config.paper_beta, tau=config.gumbel_tau)
        if config.selection == "paper":
            self.score_net = PatchSignificanceNet(config.embed_size)

    def image_states(self, img_embs: Tensor) -> LapsImageState:
        """Text-independent per-image tensors from projected image tokens [I, L_v, C]."""
        if has_cls_token(img_embs.shape[1]):
            cls, patches = img_embs[:, 0], img_embs[:, 1:]
        else:
            cls, patches = None, img_embs
        if patches.shape[1] != self.num_patches:
            raise ValueError(f"expected {self.num_patches} spatial tokens, got {patches.shape[1]}")
        prior = self.score_net(patches) if self.selection == "paper" else None
        return LapsImageState(patches=patches, cls=cls, aggr_logits=self.aggr_net.logits(patches), patch_prior=prior)

    def caption_states(self, cap_embs: Tensor, lengths: Sequence[int] | Tensor) -> LapsCaptionState:
        return LapsCaptionState.from_embeddings(cap_embs, lengths, self.max_word)

    def forward(self, img_embs: Tensor, cap_embs: Tensor, cap_lens: Sequence[int] | Tensor) -> Any:
        """Similarity [B_v, B_t]; in training mode also the kept-patch mask [B_t, B_v, N] (the ratio loss input)."""
        result = score_block(
            self.image_states(img_embs), self.caption_states(cap_embs, cap_lens), self.keep_k,
            selection=self.selection, paper=self.paper, training=self.training, return_keep=True,
        )
        if self.training:
            return result.scores, result.keep.transpose(0, 1)
        return result.scores


class LapsModel(nn.Module):
    """``lib/vse.py: VSEModel`` (img_enc, txt_enc, cross_net; the loss module has no state)."""

    def __init__(self, config: LapsConfig):
        super().__init__()
        self.config = config
        self.img_enc = LapsImageEncoder(config)
        self.txt_enc = LapsTextEncoder(config)
        self.cross_net = CrossSparseAggrNet(config, config.num_patches)

    def forward_emb(self, pixel_values: Tensor, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Both encoders, independently (``VSEModel.forward_emb``)."""
        return self.img_enc(pixel_values), self.txt_enc(input_ids)

    def forward_sim(self, img_embs: Tensor, cap_embs: Tensor, cap_lens: Sequence[int] | Tensor) -> Any:
        return self.cross_net(img_embs, cap_embs, cap_lens)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, lengths: Sequence[int] | Tensor) -> Any:
        img_embs, cap_embs = self.forward_emb(pixel_values, input_ids)
        return self.forward_sim(img_embs, cap_embs, lengths)

    def image_states(self, pixel_values: Tensor) -> LapsImageState:
        return self.cross_net.image_states(self.img_enc(pixel_values))

    def caption_states(self, input_ids: Tensor, lengths: Sequence[int] | Tensor) -> LapsCaptionState:
        return self.cross_net.caption_states(self.txt_enc(input_ids), lengths)

    def score(self, images: LapsImageState, captions: LapsCaptionState, **kwargs: Any) -> Tensor:
        """Exact LAPS scores [I, T] of stored states, chunked (see :func:`models.laps_scoring.score_matrix`)."""
        return score_matrix(images, captions, self.cross_net.keep_k, selection=self.config.selection,
                            paper=self.cross_net.paper, **kwargs)


# --------------------------------------------------------------------------------------------- checkpoints

VISION_PREFIX = "img_enc.visual_encoder."

# (transformers 4.x name, 5.x name) of every backbone entry that was renamed, as the part after VISION_PREFIX;
# {n} is a ViT layer number and {b} a Swin block path, kept as they are. Read 4.x -> 5.x to load official
# checkpoints and 5.x -> 4.x to write official-layout files (_rename_rules builds both directions).
_VIT_NAMES: list[tuple[str, str]] = [
    ("encoder.layer.{n}.attention.attention.query.", "layers.{n}.attention.q_proj."),
    ("encoder.layer.{n}.attention.attention.key.", "layers.{n}.attention.k_proj."),
    ("encoder.layer.{n}.attention.attention.value.", "layers.{n}.attention.v_proj."),
    ("encoder.layer.{n}.attention.output.dense.", "layers.{n}.attention.o_proj."),
    ("encoder.layer.{n}.intermediate.dense.", "layers.{n}.mlp.fc1."),
    ("encoder.layer.{n}.output.dense.", "layers.{n}.mlp.fc2."),
    ("encoder.layer.{n}.layernorm_before.", "layers.{n}.layernorm_before."),
    ("encoder.layer.{n}.layernorm_after.", "layers.{n}.layernorm_after."),
]
_SWIN_NAMES: list[tuple[str, str]] = [
    ("{b}.attention.self.query.", "{b}.attention.q_proj."),
    ("{b}.attention.self.key.", "{b}.attention.k_proj."),
    ("{b}.attention.self.value.", "{b}.attention.v_proj."),
    ("{b}.attention.self.relative_position_bias_table",
     "{b}.attention.relative_position_bias.relative_position_bias_table"),
    ("{b}.attention.output.dense.", "{b}.attention.o_proj."),
    ("{b}.intermediate.dense.", "{b}.mlp.fc1."),
    ("{b}.output.dense.", "{b}.mlp.fc2."),
]
_SWIN_BLOCK = r"^(encoder\.layers\.\d+\.blocks\.\d+)\."
_NAME_PLACEHOLDERS = {"{n}": r"(\d+)", "{b}": r"(encoder\.layers\.\d+\.blocks\.\d+)"}


def _rename_rules(names: list[tuple[str, str]], backward: bool = False) -> list[tuple[str, str]]:
    """Anchored (pattern, replacement) rules from a name table; a name not ending in '.' must match whole."""
    rules = []
    for old, new in names:
        source, target = (new, old) if backward else (old, new)
        pattern = "^" + re.escape(source) + ("" if source.endswith(".") else "$")
        for placeholder, group in _NAME_PLACEHOLDERS.items():
            pattern = pattern.replace(re.escape(placeholder), group)
            target = target.replace(placeholder, r"\1")
        rules.append((pattern, target))
    return rules


_VIT_RENAMES = _rename_rules(_VIT_NAMES)
_SWIN_RENAMES = _rename_rules(_SWIN_NAMES)
_VIT_RENAMES_BACK = _rename_rules(_VIT_NAMES, backward=True)
_SWIN_RENAMES_BACK = _rename_rules(_SWIN_NAMES, backward=True)
_SWIN_INDEX_4X = re.compile(_SWIN_BLOCK + r"attention\.self\.relative_position_index$")
BERT_POSITION_IDS = "txt_enc.bert.embeddings.position_ids"  # persistent only before transformers 4.31


def _rename(name: str, rules: list[tuple[str, str]]) -> str:
    for pattern, target in rules:
        renamed, count = re.subn(pattern, target, name)
        if count:
            return renamed
    return name


def _swin_index_buffers(model: LapsModel) -> dict[str, Tensor]:
    """The model's relative-position index of every Swin block, as ``[W*W, W*W]`` under its 4.x name."""
    out = {}
    for name, buf in model.img_enc.visual_encoder.named_buffers():
        if name.endswith("attention.relative_position_bias.relative_position_index"):
            block = name[: -len(".attention.relative_position_bias.relative_position_index")]
            area = int(round(buf.numel() ** 0.5))
            out[f"{VISION_PREFIX}{block}.attention.self.relative_position_index"] = buf.reshape(area, area)
    return out


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor], model: LapsModel) -> dict[str, Tensor]:
    """Map an official LAPS state dict (transformers-4.x backbone names) onto this model (5.x names).

    - drops a DataParallel ``module.`` prefix;
    - renames ViT/Swin attention and MLP entries (``attention.attention.query`` -> ``attention.q_proj`` etc.);
    - drops Swin's persistent ``relative_position_index`` buffers (5.x recomputes them, non-persistent) after
      checking they equal the model's own, and BERT's ``position_ids`` (persistent before transformers 4.31)
      after checking it is ``arange``.
    Names already in the 5.x layout pass unchanged, so files written by this project load too.
    """
    state_dict = strip_prefix(state_dict, "module.")
    rules = _SWIN_RENAMES if model.config.backbone == "swin" else _VIT_RENAMES
    own_index = _swin_index_buffers(model) if model.config.backbone == "swin" else {}
    out: dict[str, Tensor] = {}
    for name, value in state_dict.items():
        if name.startswith(VISION_PREFIX):
            inner = name[len(VISION_PREFIX):]
            if _SWIN_INDEX_4X.match(inner):
                expected = own_index.get(name)
                if expected is None or tuple(value.shape) != tuple(expected.shape) or not torch.equal(
                    value.to(expected.dtype).cpu(), expected.cpu()
                ):
                    raise ValueError(f"{name} does not match this Swin's window layout")
                continue
            name = VISION_PREFIX + _rename(inner, rules)
        elif name == BERT_POSITION_IDS:
            if not torch.equal(value.reshape(-1).cpu(), torch.arange(value.numel())):
                raise ValueError(f"{name} is not arange: position ids were customised")
            continue
        out[name] = value
    return out


def to_official_state_dict(model: LapsModel) -> dict[str, Tensor]:
    """This model's weights under the official (transformers-4.x) names.

    The inverse of :func:`checkpoint_filter_fn`: Swin's index buffers are added back as persistent entries.
    """
    swin = model.config.backbone == "swin"
    rules = _SWIN_RENAMES_BACK if swin else _VIT_RENAMES_BACK
    index = _swin_index_buffers(model) if swin else {}
    renamed: dict[str, Tensor] = {}
    for name, value in model.state_dict().items():
        if name.startswith(VISION_PREFIX):
            name = VISION_PREFIX + _rename(name[len(VISION_PREFIX):], rules)
        renamed[name] = value
    if swin:  # 4.x stored each index right after its block's relative_position_bias_table
        ordered: dict[str, Tensor] = {}
        for name, value in renamed.items():
            ordered[name] = value
            if name.endswith(".attention.self.relative_position_bias_table"):
                key = name.replace("relative_position_bias_table", "relative_position_index")
                ordered[key] = index[key]
        renamed = ordered
    return renamed


def build_official_state_dict(model: LapsModel, keys: Sequence[tuple[str, tuple[int, ...], str]],
                              fill: Any) -> dict[str, Tensor]:
    """A state dict with exactly the official key list, floats from ``fill(name, shape)`` (parity fill rule),
    integer entries (Swin index buffers) from the model itself."""
    own = to_official_state_dict(model)
    out = {}
    for name, shape, dtype in keys:
        if dtype.startswith("int") or (name in own and not torch.is_floating_point(own[name])):
            out[name] = own[name].clone()
        else:
            out[name] = torch.from_numpy(np.asarray(fill(name, shape), dtype=np.float32))
    return out


def load_official_state_dict(model: LapsModel, state_dict: Mapping[str, Tensor], source: str = "") -> None:
    """``checkpoint_filter_fn`` then a strict load naming every missing / unexpected / mis-shaped key."""
    load_state_dict_strict(model, checkpoint_filter_fn(state_dict, model), source)


def load_laps_checkpoint(path: str | Path, selection: str | None = None) -> tuple[LapsModel, dict[str, Any]]:
    """Build and strictly load an official ``model_best.pth`` (``{'model', 'opt', 'epoch', 'best_rsum', ...}``).

    The file is read with ``torch.load(weights_only=True)`` (its argparse Namespace is allow-listed); the model
    layout (backbone, embed_size, sparse_ratio, aggr_ratio) comes from ``opt``.
    """
    obj = load_checkpoint_file(path)
    if not isinstance(obj, Mapping) or "opt" not in obj:
        raise ValueError(f"{Path(path).name}: not a LAPS checkpoint (no 'opt' entry with the model options)")
    config = LapsConfig.from_options(obj["opt"])
    if selection is not None:
        config.selection = selection
    model = LapsModel(config)
    load_official_state_dict(model, find_state_dict(obj, ("model", "state_dict")), Path(path).name)
    info = {k: obj[k] for k in ("epoch", "best_rsum", "Eiters") if k in obj}
    info["config"] = asdict(config)
    return model.eval(), info


def save_official_checkpoint(model: LapsModel, path: str | Path, **info: Any) -> None:
    """Write ``model_best.pth`` in the official layout (4.x names, ``opt`` Namespace, epoch / best_rsum)."""
    state = {
        "model": to_official_state_dict(model),
        "opt": model.config.to_options(),
        "epoch": int(info.get("epoch", 0)),
        "best_rsum": float(info.get("best_rsum", 0.0)),
        "Eiters": int(info.get("Eiters", 0)),
    }
    torch.save(state, str(path))


# --------------------------------------------------------------------------------------------- service adapter

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class LapsSearchModel:
    """What the service calls for LAPS: candidate vectors for an inner-product index, stored per-image states,
    and the exact cross-modal score of states.

    Candidate stage (``encode_images`` / ``encode_texts``): image = the L2-normalised mean of the normalised
    matching tokens LAPS builds from the image alone (selection by the image self-attention score, aggregation,
    fused token, CLS); text = the L2-normalised mean of the normalised words (incl. [CLS]/[SEP], first 90).
    Their inner product is the average token-word cosine, the mean-of-means relaxation of LAPS's mean-of-max
    score (benchmarks/laps_two_stage.py compares designs).
    Exact stage: :meth:`exact_scores` on :meth:`image_states` / :meth:`caption_states` (vectorised scorer).
    Precision ``bf16`` / ``fp16`` runs the backbones under autocast; the cross-modal scorer always runs in fp32.
    """

    method = "laps"

    def __init__(self, model: LapsModel, device: str | torch.device = "cpu", precision: str = "fp32",
                 version: str = "", batch_size: int = 32):
        if precision not in ("fp32", "bf16", "fp16", "official"):
            raise ValueError(f"unknown precision {precision!r}")
        self.device = torch.device(device)
        self.precision = precision
        self.model = model.to(self.device).eval()
        self.config = model.config
        self.batch_size = batch_size
        self.version = version or f"laps-{self.config.backbone}-{_config_digest(self.config)}"

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", precision: str = "fp32",
                        **kwargs: Any) -> LapsSearchModel:
        model, _ = load_laps_checkpoint(path)
        return cls(model, device, precision, version=f"laps-{model.config.backbone}-{file_version(path)}", **kwargs)

    @classmethod
    def from_config(cls, config: LapsConfig | Mapping[str, Any] | None = None, device: str | torch.device = "cpu",
                    precision: str = "fp32", seed: int = 0, **kwargs: Any) -> LapsSearchModel:
        """A model built from a config with seeded random weights (demos, tests), no file needed."""
        if config is None:
            config = LapsConfig()
        elif not isinstance(config, LapsConfig):
            config = LapsConfig(**dict(config))
        torch.manual_seed(seed)
        model = LapsModel(config)
        return cls(model, device, precision, version=f"laps-{config.backbone}-random{seed}-{_config_digest(config)}",
                   **kwargs)

    @property
    def embed_dim(self) -> int:
        return int(self.config.embed_size)

    # -- encoders
    def _autocast(self) -> Any:
        dtype = _AUTOCAST_DTYPES.get(self.precision)
        if dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.no_grad()
    def image_states(self, images: Sequence[Image.Image]) -> LapsImageState:
        """Text-independent per-image tensors (backbone + projection + aggregation logits), on the CPU."""
        if not images:
            raise ValueError("no images")
        parts = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size]
            pixels = preprocess_images(batch, self.config.image_size).to(self.device)
            with self._autocast():
                embs = self.model.img_enc(pixels)
            parts.append(self.model.cross_net.image_states(embs.float()).to("cpu"))
        return LapsImageState.cat(parts)

    @torch.no_grad()
    def caption_states(self, texts: Sequence[str]) -> LapsCaptionState:
        """Per-caption word tensors (BERT + fc on the full caption, then the first 90 words), on the CPU."""
        if not texts:
            raise ValueError("no texts")
        parts = []
        for start in range(0, len(texts), self.batch_size):
            ids, lengths = pad_token_ids(tokenize_captions(texts[start:start + self.batch_size]))
            with self._autocast():
                embs = self.model.txt_enc(ids.to(self.device))
            parts.append(self.model.cross_net.caption_states(embs.float(), lengths).to("cpu"))
        return LapsCaptionState.cat(parts)

    def image_vectors(self, states: LapsImageState) -> np.ndarray:
        """Candidate-stage vectors [I, D] of stored image states (see class docstring)."""
        return candidate_image_vectors(states, self.config.keep_k).float().cpu().numpy()

    @staticmethod
    def caption_vectors(states: LapsCaptionState) -> np.ndarray:
        """Candidate-stage vectors [T, D] of caption states (mean of normalised words, normalised)."""
        return candidate_caption_vectors(states).float().cpu().numpy()

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        return self.image_vectors(self.image_states(images))

    def encode_images_with_states(self, images: list[Image.Image]) -> tuple[np.ndarray, list[bytes]]:
        """Candidate vectors and stored-state blobs from one backbone pass (adding images to a gallery)."""
        states = self.image_states(images)
        return self.image_vectors(states), [states.to_bytes(i) for i in range(len(states))]

    def image_state_bytes(self, images: list[Image.Image]) -> list[bytes]:
        """One blob per image (:meth:`LapsImageState.to_bytes`): what the service stores for exact re-scoring."""
        states = self.image_states(images)
        return [states.to_bytes(i) for i in range(len(states))]

    @staticmethod
    def state_from_bytes(blob: bytes | Sequence[bytes]) -> LapsImageState:
        """A blob (or several) from :meth:`image_state_bytes` back into a batched state."""
        return LapsImageState.from_bytes(blob)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return self.caption_vectors(self.caption_states(texts))

    def exact_scores(self, image_states: LapsImageState, caption_states: LapsCaptionState,
                     **kwargs: Any) -> np.ndarray:
        """Exact LAPS scores [I, T] float32 (rows = images); text->image and image->text rank the same matrix."""
        device = self.device
        scores = self.model.score(image_states.to(device), caption_states.to(device), **kwargs)
        return scores.cpu().numpy()


def _config_digest(config: LapsConfig) -> str:
    return hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()[:10]
