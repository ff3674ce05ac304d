"""IRRA: Cross-Modal Implicit Relation Reasoning and Aligning for Text-to-Image Person Retrieval (CVPR 2023).

A reimplementation of the official ``anosorae/IRRA`` (@ cfc2378) that loads its ``best.pth`` strictly:

- ``base_model``: OpenAI CLIP ViT-B/16 on 384x128 person crops (stride 16 -> 24x8 grid + CLS = 193 tokens)
  and the CLIP text transformer; global features are the image CLS token and the text EOT token
  (``argmax`` of the ids, EOT = 49407 being the largest id), both after the final LN and projection.
- IRR (implicit relation reasoning, used for the MLM training task only): ``cross_attn`` (text queries,
  image keys/values, *no* residual) -> ``cross_modal_transformer`` (4 blocks, no mask) -> ``ln_post`` ->
  ``mlm_head`` (dense, QuickGELU, LN, fc to the 49,408-word vocabulary).
- ``classifier``: the ID-loss head shared by both modalities.
- ``logit_scale`` = 1 / temperature = 50 is a constant, not a state_dict entry (nor is the causal mask).

Losses (paper: IRR and SDM sections; ``model/objectives.py``): SDM (KL between the softmaxed scaled-cosine
distribution and the normalised true-match distribution, eps 1e-8), ID (cross-entropy, image and text
averaged) and MLM (cross-entropy over masked positions, ignore index 0; plain CE, not the paper's 1/|V|).

Precision modes: ``fp32``; ``official`` = the official ``convert_weights`` placement, fp16
Conv/Linear/MHA/proj with LayerNorm computed in fp32, which is what the released weights were trained in
(``fp16`` is the same placement, but the retrieval adapter then also crops texts after their EOT);
``bf16`` = float32 weights under ``torch.autocast(bfloat16)``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields, replace
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
from models.clip import CLIP, LayerNorm, QuickGELU, Transformer, convert_weights_to_fp16
from models.clip_tokenizer import irra_tokenizer

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP statistics
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
PRECISIONS = ("fp32", "official", "fp16", "bf16")


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class IRRAConfig:
    """IRRA model settings; the defaults are the released CUHK-PEDES model (ViT-B/16, 384x128, 11003 ids)."""

    embed_dim: int = 512
    image_size: tuple[int, int] = (384, 128)  # (H, W)
    patch_size: int = 16
    stride_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    cmt_depth: int = 4
    cross_heads: int = 8
    num_classes: int = 11003  # CUHK-PEDES 11003, ICFG-PEDES 3102, RSTPReid 3701
    loss_names: str = "sdm+mlm+id"  # which heads exist: 'id' -> classifier, 'mlm' -> IRR modules
    temperature: float = 0.02

    @property
    def tasks(self) -> set[str]:
        return {name.strip() for name in self.loss_names.split("+")}

    @property
    def logit_scale(self) -> float:
        return 1.0 / self.temperature

    @property
    def grid(self) -> tuple[int, int]:
        """(num_y, num_x) patch grid of the image tower."""
        h, w = self.image_size
        return (h - self.patch_size) // self.stride_size + 1, (w - self.patch_size) // self.stride_size + 1

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> IRRAConfig:
        """Build from a dict such as a parity case's ``config`` (``img_size`` is accepted for ``image_size``;
        keys that are not fields, like ``dataset``, are ignored)."""
        values = dict(values)
        if "img_size" in values and "image_size" not in values:
            values["image_size"] = values.pop("img_size")
        known = {f.name for f in fields(cls)}
        kept = {k: v for k, v in values.items() if k in known}
        if "image_size" in kept:
            kept["image_size"] = tuple(int(v) for v in kept["image_size"])
        return cls(**kept)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _count_blocks(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int | None:
    pattern = re.compile(re.escape(prefix) + r"resblocks\.(\d+)\.")
    found = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    return max(found) + 1 if found else None


def config_from_state_dict(state_dict: Mapping[str, torch.Tensor],
                           base: IRRAConfig | None = None) -> IRRAConfig:
    """Read an IRRA config off a checkpoint's shapes (widths, depths, vocabulary, classes, heads present).

    Head counts follow the official rule ``width // 64``. The patch grid comes from the visual position
    table: with the base config's image size it must give the same number of patches, otherwise the grid
    is taken with the base config's aspect ratio (``num_y / num_x``). Values whose keys are missing keep the
    base config's value, so the strict load that follows names every missing key.
    """
    base = base or IRRAConfig()
    sd = state_dict

    def dim(key: str, axis: int, default: int) -> int:
        return int(sd[key].shape[axis]) if key in sd and sd[key].dim() > axis else default

    vision_width = dim("base_model.visual.conv1.weight", 0, base.vision_width)
    text_width = dim("base_model.ln_final.weight", 0, base.text_width)
    embed_dim = dim("base_model.text_projection", 1, base.embed_dim)
    patch_size = dim("base_model.visual.conv1.weight", 3, base.patch_size)
    has_id = "classifier.weight" in sd
    has_mlm = any(k.startswith(("cross_attn.", "mlm_head.", "cross_modal_transformer.")) for k in sd)
    config = replace(
        base,
        embed_dim=embed_dim,
        patch_size=patch_size,
        vision_width=vision_width,
        vision_layers=_count_blocks(sd, "base_model.visual.transformer.") or base.vision_layers,
        vision_heads=max(1, vision_width // 64),
        context_length=dim("base_model.positional_embedding", 0, base.context_length),
        vocab_size=dim("base_model.token_embedding.weight", 0, base.vocab_size),
        text_width=text_width,
        text_layers=_count_blocks(sd, "base_model.transformer.") or base.text_layers,
        text_heads=max(1, text_width // 64),
        cmt_depth=_count_blocks(sd, "cross_modal_transformer.") or base.cmt_depth,
        cross_heads=max(1, embed_dim // 64),
        num_classes=dim("classifier.weight", 0, base.num_classes),
        loss_names="+".join(["sdm", *(["mlm"] if has_mlm else []), *(["id"] if has_id else [])]),
    )
    if "base_model.visual.positional_embedding" in sd:
        num_patches = int(sd["base_model.visual.positional_embedding"].shape[0]) - 1
        config = _with_grid(config, num_patches)
    return config


def _with_grid(config: IRRAConfig, num_patches: int) -> IRRAConfig:
    num_y, num_x = config.grid
    if num_y * num_x == num_patches:
        return config
    aspect = num_y / num_x
    for nx in range(1, num_patches + 1):
        if num_patches % nx == 0 and num_patches // nx == round(nx * aspect):
            ny = num_patches // nx
            step, patch = config.stride_size, config.patch_size
            return replace(config, image_size=((ny - 1) * step + patch, (nx - 1) * step + patch))
    raise ValueError(
        f"checkpoint has {num_patches} patch positions; image_size {config.image_size} with stride "
        f"{config.stride_size} gives {num_y}x{num_x}, and no grid of aspect {aspect:g} has {num_patches}"
    )


# --------------------------------------------------------------------------------------------- model


def image_global_feature(image_tokens: torch.Tensor) -> torch.Tensor:
    """The image embedding: the CLS token of ``base_model.encode_image``, as float32."""
    return image_tokens[:, 0, :].float()


def text_global_feature(text_tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The text embedding: the token at the EOT position (EOT 49407 is the largest id, so ``argmax``)."""
    rows = torch.arange(text_tokens.shape[0], device=text_tokens.device)
    return text_tokens[rows, text.argmax(dim=-1)].float()


class IRRA(nn.Module):
    """The official IRRA module tree (``model/build.py``); names match the released state dicts."""

    def __init__(self, config: IRRAConfig | None = None):
        super().__init__()
        self.config = config = config or IRRAConfig()
        self.base_model = CLIP(
            embed_dim=config.embed_dim,
            image_resolution=config.image_size,
            vision_layers=config.vision_layers,
            vision_width=config.vision_width,
            vision_heads=config.vision_heads,
            vision_patch_size=config.patch_size,
            stride_size=config.stride_size,
            context_length=config.context_length,
            vocab_size=config.vocab_size,
            transformer_width=config.text_width,
            transformer_heads=config.text_heads,
            transformer_layers=config.text_layers,
        )
        self.logit_scale = config.logit_scale  # a constant (official: plain attribute, not in the state_dict)
        dim = config.embed_dim
        if "id" in config.tasks:
            self.classifier = nn.Linear(dim, config.num_classes)
        if "mlm" in config.tasks:
            self.cross_attn = nn.MultiheadAttention(dim, config.cross_heads, batch_first=True)
            self.cross_modal_transformer = Transformer(dim, config.cmt_depth, config.cross_heads)
            self.ln_pre_t = LayerNorm(dim)
            self.ln_pre_i = LayerNorm(dim)
            self.ln_post = LayerNorm(dim)
            self.mlm_head = nn.Sequential()
            self.mlm_head.add_module("dense", nn.Linear(dim, dim))
            self.mlm_head.add_module("gelu", QuickGELU())  # parameter-free slot, kept for the official names
            self.mlm_head.add_module("ln", LayerNorm(dim))
            self.mlm_head.add_module("fc", nn.Linear(dim, config.vocab_size))
        self.init_heads()

    def init_heads(self) -> None:
        """Official initialisation of the IRRA heads (the CLIP part is initialised by ``CLIP``)."""
        if getattr(self, "classifier", None) is not None:
            nn.init.normal_(self.classifier.weight, std=0.001)
            nn.init.zeros_(self.classifier.bias)
        if getattr(self, "cross_attn", None) is not None:
            self.cross_modal_transformer.init_weights()
            attn_std = self.config.embed_dim**-0.5
            proj_std = attn_std * (2 * self.config.cmt_depth) ** -0.5
            fc_std = (2 * self.config.embed_dim) ** -0.5
            nn.init.normal_(self.cross_attn.in_proj_weight, std=attn_std)
            nn.init.normal_(self.cross_attn.out_proj.weight, std=proj_std)
            nn.init.normal_(self.mlm_head.dense.weight, std=fc_std)
            nn.init.normal_(self.mlm_head.fc.weight, std=proj_std)

    def drop_training_heads(self) -> None:
        """Free the classifier and IRR modules (~45M parameters): retrieval never calls them."""
        for name in ("classifier", "cross_attn", "cross_modal_transformer", "ln_pre_t", "ln_pre_i", "ln_post",
                     "mlm_head"):
            if getattr(self, name, None) is not None:
                setattr(self, name, None)

    # ---- global features (model/build.py encode_image / encode_text)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] normalised pixels -> [N, embed_dim] float32 CLS features (not normalised)."""
        return image_global_feature(self.base_model.encode_image(image))

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """[N, L] token ids -> [N, embed_dim] float32 features at the EOT position (``argmax`` of the ids)."""
        return text_global_feature(self.base_model.encode_text(text), text)

    # ---- IRR / MLM branch

    def cross_former(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Cross-modal interaction encoder: [N, Lt, D] text tokens attend to [N, Li, D] image tokens.

        No residual around the cross-attention and no padding mask, as in the official code."""
        x = self.cross_attn(self.ln_pre_t(q), self.ln_pre_i(k), self.ln_pre_i(v), need_weights=False)[0]
        x = self.cross_modal_transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x)

    def mlm_scores(self, mlm_ids: torch.Tensor, image_tokens: torch.Tensor,
                   text_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Vocabulary scores [N * L, vocab] (float32) for every text position of the masked captions.

        ``image_tokens`` is the full ``base_model.encode_image`` output; ``text_tokens`` may pass an already
        computed ``base_model.encode_text(mlm_ids)``."""
        if text_tokens is None:
            text_tokens = self.base_model.encode_text(mlm_ids)
        x = self.mlm_head(self.cross_former(text_tokens, image_tokens, image_tokens))
        return x.float().reshape(-1, self.config.vocab_size)

    def id_logits(self, feats: torch.Tensor) -> torch.Tensor:
        """Shared ID classifier; features are cast to the classifier's dtype (official: ``.half()``)."""
        return self.classifier(feats.to(self.classifier.weight.dtype)).float()

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Training outputs as ``model/build.py`` returns them (the trainer sums every ``*_loss``).

        batch: ``images``, ``caption_ids``, ``pids`` and, for MLM, ``mlm_ids``/``mlm_labels``. Official quirk
        kept by the data pipeline, not here: in official training ``caption_ids`` *is* the masked caption
        (an in-place aliasing in ``datasets/bases.py``), so SDM and ID see masked text. When the two tensors
        are equal the text tower runs once (same values and gradients)."""
        cfg = self.config
        images, caption_ids, pids = batch["images"], batch["caption_ids"], batch["pids"]
        image_tokens = self.base_model.encode_image(images)
        text_tokens = self.base_model.encode_text(caption_ids)
        i_feats = image_global_feature(image_tokens)
        t_feats = text_global_feature(text_tokens, caption_ids)
        out: dict[str, torch.Tensor] = {"temperature": torch.tensor(1.0 / self.logit_scale)}
        if "sdm" in cfg.tasks:
            out["sdm_loss"] = compute_sdm(i_feats, t_feats, pids, self.logit_scale)
        if "itc" in cfg.tasks:
            out["itc_loss"] = compute_itc(i_feats, t_feats, self.logit_scale)
        if "id" in cfg.tasks:
            image_logits, text_logits = self.id_logits(i_feats), self.id_logits(t_feats)
            out["id_loss"] = compute_id(image_logits, text_logits, pids)
            out["img_acc"] = (image_logits.argmax(dim=1) == pids).float().mean()
            out["txt_acc"] = (text_logits.argmax(dim=1) == pids).float().mean()
        if "mlm" in cfg.tasks:
            mlm_ids, mlm_labels = batch["mlm_ids"], batch["mlm_labels"].reshape(-1)
            reuse = mlm_ids.shape == caption_ids.shape and torch.equal(mlm_ids, caption_ids)
            scores = self.mlm_scores(mlm_ids, image_tokens, text_tokens if reuse else None)
            out["mlm_loss"] = compute_mlm(scores, mlm_labels)
            labelled = mlm_labels != 0
            out["mlm_acc"] = (scores[labelled].argmax(dim=1) == mlm_labels[labelled]).float().mean()
        return out


# --------------------------------------------------------------------------------------------- losses


def compute_sdm(image_feats: torch.Tensor, text_feats: torch.Tensor, pids: torch.Tensor,
                logit_scale: float | torch.Tensor, epsilon: float = 1e-8) -> torch.Tensor:
    """Similarity Distribution Matching (paper's SDM; ``objectives.compute_sdm`` with ``image_id=None``).

    q_ij = [pid_i == pid_j] / sum_j [...]; p = softmax(scale * cos); loss = mean_i KL(p_i || q_i) for
    image->text plus the same for text->image (summed, not averaged). Features are divided by their norm
    without an eps, as in the official code."""
    pids = pids.reshape(-1, 1)
    labels = (pids == pids.t()).float()
    q = labels / labels.sum(dim=1, keepdim=True)  # y is symmetric, so this equals the official broadcast
    image_norm = image_feats / image_feats.norm(dim=1, keepdim=True)
    text_norm = text_feats / text_feats.norm(dim=1, keepdim=True)
    t2i = logit_scale * (text_norm @ image_norm.t())
    i2t = t2i.t()
    log_q = torch.log(q + epsilon)
    i2t_loss = F.softmax(i2t, dim=1) * (F.log_softmax(i2t, dim=1) - log_q)
    t2i_loss = F.softmax(t2i, dim=1) * (F.log_softmax(t2i, dim=1) - log_q)
    return i2t_loss.sum(dim=1).mean() + t2i_loss.sum(dim=1).mean()


def compute_id(image_logits: torch.Tensor, text_logits: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
    """ID loss: mean of the image and text cross-entropies over person ids (``objectives.compute_id``)."""
    return (F.cross_entropy(image_logits, pids) + F.cross_entropy(text_logits, pids)) / 2


def compute_mlm(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """IRR/MLM loss: cross-entropy over the positions whose label is not 0 (``ignore_index=0``)."""
    return F.cross_entropy(scores, labels, ignore_index=0)


def compute_itc(image_feats: torch.Tensor, text_feats: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Symmetric InfoNCE (present in the official code, unused by the released 'sdm+mlm+id' models)."""
    image_norm = image_feats / image_feats.norm(dim=-1, keepdim=True)
    text_norm = text_feats / text_feats.norm(dim=-1, keepdim=True)
    logits = logit_scale * image_norm @ text_norm.t()
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


# --------------------------------------------------------------------------------------------- preprocessing


def preprocess_image(image: Image.Image, image_size: tuple[int, int] = (384, 128)) -> np.ndarray:
    """Official test transform: RGB, PIL bilinear resize to (W, H) (aspect ignored, no crop, PIL's own
    antialiasing filter), /255, CLIP mean/std. Returns float32 [3, H, W]."""
    height, width = image_size
    resized = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(resized, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    mean = np.asarray(IMAGE_MEAN, dtype=np.float32)
    std = np.asarray(IMAGE_STD, dtype=np.float32)
    return ((pixels - mean) / std).transpose(2, 0, 1).copy()


def crop_to_longest(token_ids: torch.Tensor) -> torch.Tensor:
    """Cut a padded [N, 77] batch after its last EOT (``max(argmax) + 1`` columns). With the causal mask the
    EOT features do not depend on the padding after them, so the result is the same, with less work."""
    if token_ids.numel() == 0:
        return token_ids
    return token_ids[:, : int(token_ids.argmax(dim=-1).max()) + 1]


# --------------------------------------------------------------------------------------------- precision


def apply_precision(model: IRRA, precision: str) -> IRRA:
    """Put float32 weights into the dtypes a precision mode needs (in place): ``official``/``fp16`` apply
    the official ``convert_weights``; ``fp32`` and ``bf16`` (autocast at call time) keep float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision in ("official", "fp16"):
        convert_weights_to_fp16(model)
    return model


def precision_context(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast(bfloat16)`` for ``bf16``; nothing otherwise (fp16 weights carry their own dtype)."""
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------- checkpoints


def checkpoint_filter_fn(checkpoint: Any) -> dict[str, torch.Tensor]:
    """Map an official IRRA file onto this model's state dict.

    The official ``Checkpointer`` saves ``{'model': state_dict, 'optimizer': ..., 'scheduler': ...,
    'num_epoch': ..., 'iteration': ..., 'epoch': ...}``; a bare state dict is accepted too. A DataParallel
    ``module.`` prefix is removed. Nothing else is renamed: the names are the model's own."""
    state_dict = find_state_dict(checkpoint, candidates=("model", "state_dict"))
    state_dict = strip_prefix(state_dict, "module.")
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"not an IRRA state dict: entries that are not tensors: {not_tensors[:5]}")
    return state_dict


def load_irra_checkpoint(path: str | Path, base_config: IRRAConfig | None = None) -> IRRA:
    """Build an IRRA whose shapes are read off ``path`` and load it strictly (``weights_only=True``).

    Raises ``CheckpointMismatchError`` naming missing, unexpected and mis-shaped keys for a wrong file, and
    ``ValueError`` for a file that holds no state dict. The model comes back in float32 (the file's fp16
    entries are widened exactly); see ``apply_precision`` for the official fp16 placement."""
    checkpoint = load_checkpoint_file(path)
    state_dict = checkpoint_filter_fn(checkpoint)
    if not any(k.startswith("base_model.") for k in state_dict):
        raise ValueError(f"{Path(path).name} is not an IRRA checkpoint: no 'base_model.*' entries "
                         f"(first keys: {list(state_dict)[:5]})")
    config = config_from_state_dict(state_dict, base_config)
    heads = checkpoint.get("heads") if isinstance(checkpoint, dict) else None
    if isinstance(heads, dict):  # files written by training.train; official files follow width // 64
        config = replace(config, vision_heads=int(heads.get("vision", config.vision_heads)),
                         text_heads=int(heads.get("text", config.text_heads)),
                         cross_heads=int(heads.get("cross", config.cross_heads)))
    model = IRRA(config)
    load_state_dict_strict(model, state_dict, source=Path(path).name)
    return model.eval()


# ------------------------------------------------------------------------------------------- service adapter


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class IRRARetrievalModel:
    """``models.base.RetrievalModel`` for IRRA: person crops and captions into one 512-d cosine space.

    Images and texts are encoded in batches under ``torch.inference_mode()``; the classifier and IRR
    modules are dropped after loading (retrieval never uses them). ``crop_text`` (default: on, except in
    the ``official`` precision) cuts each text batch after its longest caption's EOT."""

    method = "irra"

    def __init__(self, model: IRRA, device: str | torch.device = "cpu", precision: str = "fp32",
                 version: str = "random-init", image_batch_size: int = 32, text_batch_size: int = 64,
                 crop_text: bool | None = None, keep_training_heads: bool = False):
        if not keep_training_heads:
            model.drop_training_heads()
        self.device = torch.device(device)
        self.precision = precision
        self.model = apply_precision(model, precision).to(self.device).eval()
        self.config = model.config
        self.version = version
        self.embed_dim = model.config.embed_dim
        self.image_batch_size = image_batch_size
        self.text_batch_size = text_batch_size
        # Cropping after the last EOT is exact in float32 (~1e-6) but moves fp16 results by kernel noise
        # (~4e-3 on the encode case), so the 'official' mode keeps the full 77 positions by default.
        self.crop_text = precision != "official" if crop_text is None else crop_text
        self.tokenizer = irra_tokenizer(model.config.context_length)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", precision: str = "fp32",
                        base_config: IRRAConfig | None = None, **kwargs: Any) -> IRRARetrievalModel:
        """Load an official ``best.pth``; ``version`` is the short sha256 of the file."""
        model = load_irra_checkpoint(path, base_config)
        return cls(model, device, precision, version=file_version(path), **kwargs)

    @classmethod
    def from_config(cls, config: IRRAConfig | None = None, device: str | torch.device = "cpu",
                    precision: str = "fp32", fill: bool = False, seed: int | None = None,
                    **kwargs: Any) -> IRRARetrievalModel:
        """A model without a checkpoint: CLIP/IRRA random initialisation (``seed`` for repeatability), or
        with ``fill=True`` the parity fill rule ``crc32-normal-v1`` (deterministic, version 'crc32-fill')."""
        if seed is not None:
            torch.manual_seed(seed)
        model = IRRA(config or IRRAConfig())
        version = "random-init"
        if fill:
            from models.parity import fill_module

            fill_module(model)
            version = "crc32-fill"
        return cls(model, device, precision, version=version, **kwargs)

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.from_numpy(np.stack([preprocess_image(img, self.config.image_size) for img in images]))

    def token_ids(self, texts: list[str]) -> torch.Tensor:
        return torch.from_numpy(self.tokenizer(texts))

    @torch.inference_mode()
    def encode_pixel_values(self, pixel_values: torch.Tensor) -> np.ndarray:
        """Preprocessed [N, 3, H, W] -> L2-normalised float32 [N, D] (one forward, no batching)."""
        with precision_context(self.precision, self.device):
            feats = self.model.encode_image(pixel_values.to(self.device))
        return F.normalize(feats.float(), p=2, dim=-1).cpu().numpy()

    @torch.inference_mode()
    def encode_token_ids(self, token_ids: torch.Tensor) -> np.ndarray:
        """[N, 77] token ids -> L2-normalised float32 [N, D] (one forward, cropped after the last EOT)."""
        if self.crop_text:
            token_ids = crop_to_longest(token_ids)
        with precision_context(self.precision, self.device):
            feats = self.model.encode_text(token_ids.to(self.device))
        return F.normalize(feats.float(), p=2, dim=-1).cpu().numpy()

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        """Person crops -> [N, D] float32, L2-normalised, in batches of ``image_batch_size``."""
        out = [np.zeros((0, self.embed_dim), dtype=np.float32)]
        for part in _batches(len(images), self.image_batch_size):
            out.append(self.encode_pixel_values(self.pixel_values(images[part])))
        return np.concatenate(out, axis=0)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Captions -> [N, D] float32, L2-normalised, in batches of ``text_batch_size``."""
        out = [np.zeros((0, self.embed_dim), dtype=np.float32)]
        for part in _batches(len(texts), self.text_batch_size):
            out.append(self.encode_token_ids(self.token_ids(texts[part])))
        return np.concatenate(out, axis=0)
