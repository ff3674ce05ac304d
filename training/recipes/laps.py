"""LAPS training recipe (CrossmodalGroup/LAPS ``train.py`` / ``lib/vse.py``, research notes section 5).

- Data: Karpathy train split, caption-level (caption i with image i // 5), LAPS's train augmentation and
  the word-level caption corruption (``process_caption_bert``: 20% of the words masked / replaced / deleted);
  the batch is sorted by caption length (``collate_fn_ours``).
- Loss: bidirectional hinge, margin 0.2, every pair of the same image masked, sum reduction; in the first
  epoch the sum over all negatives scaled by a linear warm-up ``i / n_batch``, from then on the hardest
  negative only (VSE++). Plus ``ratio_weight`` (2.0) x the ratio term ``(mean keep - rho)^2`` (a constant
  with the released hard top-K; a real constraint with ``selection="paper"``).
- Optimiser: AdamW, lr 2e-4, weight decay 1e-4; the BERT and the vision backbone at 0.1 x lr.
- Schedule: per epoch, x0.3 at epochs 9, 15, 20, 25; 30 epochs; gradient norm clipped at 2.0.
- A NaN / Inf loss is replaced by 0 officially; here the trainer stops on it instead (it names the step).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.laps import LapsConfig, LapsModel, to_official_state_dict
from models.tokenizers import bert_tokenizer
from training.datasets import (
    KarpathyCaptionDataset,
    TextCache,
    bert_word_pieces,
    image_reader,
    laps_size_augment,
    laps_test_transform,
    laps_train_transform,
    read_karpathy_split,
)
from training.laps_metrics import contrastive_loss, ratio_loss
from training.trainer import Batch, Config, Losses, Recipe, StepContext, group_by, step_decay

OFFICIAL: Config = {
    "image_cache_mb": 0,  # MB of decoded images held in memory per data process (0: read every time)
    "dataset": "f30k", "epochs": 30, "batch_size": 128, "num_workers": 0, "log_every": 50, "save_every": 0,
    "seed": 0, "clip_grad_norm": 2.0,
    "model": {"backbone": "vit", "embed_size": 512, "sparse_ratio": 0.5, "aggr_ratio": 0.4, "vision": {},
              "text": {}},
    "lr": 2e-4, "weight_decay": 1e-4, "backbone_lr_factor": 0.1, "decay_epochs": [9, 15, 20, 25],
    "decay_rate": 0.3, "margin": 0.2, "ratio_weight": 2.0, "vse_mean_warmup_epochs": 1,
    "embedding_warmup_epochs": 0, "size_augment": True, "export_fp16": False, "epoch_samples": None,
    "image_augment": True,  # LAPS's train transform (RandomResizedCrop + flip); False: the test transform
}

# Small ViT (64x64 input, 8x8 patches -> 64 tokens, width 96, 3 layers) and BERT (width 64, 2 layers), from
# random weights (the released model starts from ImageNet-21k ViT and BERT-base). Deviations from the official
# recipe, all for that reason:
# - lr 1e-3 everywhere (official 2e-4, backbones x0.1), x0.3 once at epoch 28 of 36 epochs of 3200 captions
#   (3600 steps; about 0.145 s each on one idle CPU thread: about 9 min). Held-out t2i R@1 after 15 epochs
#   (BERT width 64, decay at 9, hardest negative from 10): 31.9; after 36: 51.1;
# - the all-negatives hinge for 24 epochs (official: the first epoch only), then the hardest negative: from random
#   weights the hardest-negative hinge collapses (every score equal, loss = 2 B margin); after 1000 steps of
#   all-negatives it trains (300 hardest-negative steps at lr 3e-4: held-out t2i R@1 28.0 -> 29.0);
# - no train augmentation (image_augment False: test transform; size_augment False: no word corruption): with
#   captions that name every object, size and the background, RandomResizedCrop (cuts objects out, rescales
#   them) and masking / deleting 20% of the words make many training pairs wrong (without them: held-out t2i
#   R@1 13.5 after 400 steps; with them, on the generator-1 captions: 0.9 after 300).
DEMO: Config = {
    **OFFICIAL, "image_cache_mb": 1024,  # the demo data fits decoded in memory
    "dataset": "synth", "epochs": 36, "epoch_samples": 3200, "batch_size": 32, "log_every": 10, "lr": 1e-3,
    "backbone_lr_factor": 1.0, "decay_epochs": [28], "vse_mean_warmup_epochs": 24,
    "image_augment": False, "size_augment": False,
    "model": {
        "backbone": "vit", "embed_size": 64, "sparse_ratio": 0.5, "aggr_ratio": 0.4,
        "vision": {"image_size": 64, "patch_size": 8, "hidden_size": 96, "num_hidden_layers": 3,
                   "num_attention_heads": 2, "intermediate_size": 192},
        "text": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
                 "max_position_embeddings": 64}},
    "export_fp16": True,
    "demo_note": "from random weights (no ImageNet ViT / BERT); ViT 64x64, 8 px patches, width 96, 3 layers; BERT "
                 "width 64, 2 layers; embed 64; AdamW lr 1e-3 everywhere, x0.3 at epoch 28 of 36 (3200 captions "
                 "each), batch 32; all-negatives hinge for 24 epochs, then the hardest negative; no image "
                 "augmentation, no caption corruption; fp16 export; caption data generator 2 (every caption names "
                 "the whole scene)",
}

TINY: Config = {
    **DEMO, "epochs": 1, "epoch_samples": None, "batch_size": 8, "lr": 3e-3, "decay_epochs": [],
    "model": {**DEMO["model"], "embed_size": 24,
              "vision": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "intermediate_size": 64},
              "text": {**DEMO["model"]["text"], "hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64}},
}


class LapsTrainDataset(KarpathyCaptionDataset):
    """Caption-level items with the caption corrupted word by word and tokenised (``PrecompRegionDataset``)."""

    def __init__(self, *args: Any, size_augment: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tokenizer = bert_tokenizer()
        vocab = self.tokenizer.get_vocab()
        self.vocab = sorted(vocab, key=vocab.__getitem__)  # by id: get_vocab()'s order varies per instance
        self.size_augment = size_augment
        # the words and pieces of a caption, as tuples: cached values must not be changed
        self.word_pieces = TextCache(lambda text: tuple(tuple(p) for p in bert_word_pieces(text, self.tokenizer)))

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = super().__getitem__(index)
        pieces = self.word_pieces(sample["caption"])
        tokens = laps_size_augment(pieces, self.vocab, train=self.size_augment, rng=random)
        sample["tokens"] = self.tokenizer.convert_tokens_to_ids(tokens)
        return sample


class LapsRecipe(Recipe):
    name = "laps"
    schedule_unit = "epoch"
    export_name = "laps.pth"
    word_embedding_key = "txt_enc.bert.embeddings.word_embeddings.weight"  # official (transformers 4.x) name
    configs = {"official": OFFICIAL, "demo": DEMO, "tiny": TINY}

    def model_config(self, config: Config) -> LapsConfig:
        values = dict(config["model"])
        return LapsConfig(margin=config["margin"], ratio_weight=config["ratio_weight"], **values)

    def vocabulary_rows(self, texts: list[str], config: Config) -> set[int] | None:
        """None with the caption corruption (``size_augment``): it draws random vocabulary tokens."""
        return None if config["size_augment"] else self.text_token_ids(texts, config)

    def build_model(self, config: Config) -> nn.Module:
        return LapsModel(self.model_config(config))

    def train_dataset(self, data_dir: Path, config: Config) -> LapsTrainDataset:
        split = read_karpathy_split(Path(data_dir) / config["dataset"], "train")
        image_root = Path(data_dir) / "images"
        size = int(self.model_config(config).image_size)
        transform = laps_train_transform(size) if config.get("image_augment", True) else laps_test_transform(size)
        return LapsTrainDataset(split, image_root, transform, size_augment=config["size_augment"],
                                image_reader=image_reader(config.get("image_cache_mb", 0)))

    def collate(self, samples: list[dict[str, Any]], config: Config) -> Batch:
        """``collate_fn_ours``: sorted by caption length (descending), zero-padded."""
        samples = sorted(samples, key=lambda s: len(s["tokens"]), reverse=True)
        lengths = torch.tensor([len(s["tokens"]) for s in samples], dtype=torch.long)
        ids = torch.zeros(len(samples), int(lengths.max()), dtype=torch.long)
        for row, sample in enumerate(samples):
            ids[row, : len(sample["tokens"])] = torch.tensor(sample["tokens"], dtype=torch.long)
        return {"images": torch.stack([s["image"] for s in samples]), "input_ids": ids, "lengths": lengths,
                "img_ids": torch.tensor([s["image_id"] for s in samples], dtype=torch.long)}

    def param_groups(self, model: nn.Module, config: Config) -> list[dict[str, Any]]:
        def settings(name: str) -> dict[str, Any]:  # lib/vse.py create_optimizer
            if name.startswith(("txt_enc.bert.", "img_enc.visual_encoder.")):
                return {"lr": config["lr"] * config["backbone_lr_factor"]}
            return {"lr": config["lr"]}

        return group_by(model, settings)

    def optimizer(self, groups: list[dict[str, Any]], config: Config) -> torch.optim.Optimizer:
        return torch.optim.AdamW(groups, lr=config["lr"], weight_decay=config["weight_decay"])

    def lr_multiplier(self, config: Config, steps_per_epoch: int) -> Any:
        return step_decay(config["decay_epochs"], config["decay_rate"])

    def loss(self, model: nn.Module, batch: Batch, ctx: StepContext) -> Losses:
        cfg = ctx.config
        laps: LapsModel = model  # type: ignore[assignment]
        scores, keep = laps(batch["images"], batch["input_ids"], batch["lengths"])
        max_violation = ctx.epoch >= cfg["vse_mean_warmup_epochs"]
        warmup_alpha = 1.0
        if ctx.epoch <= cfg["embedding_warmup_epochs"]:  # train.py: alpha = i / n_batch in the first epoch
            warmup_alpha = ctx.step_in_epoch / max(ctx.steps_per_epoch, 1)
        align = contrastive_loss(scores.float(), batch["img_ids"], cfg["margin"], max_violation)
        ratio = ratio_loss(keep, laps.config.sparse_ratio)
        return {"align_loss": warmup_alpha * align, "ratio_loss": cfg["ratio_weight"] * ratio,
                "hardest_negative": torch.tensor(float(max_violation))}

    def export(self, model: nn.Module, path: Path, config: Config, info: dict[str, Any]) -> None:
        """``model_best.pth`` in the official layout (transformers 4.x names, ``opt`` Namespace)."""
        laps: LapsModel = model  # type: ignore[assignment]
        state = to_official_state_dict(laps)
        if config["export_fp16"]:
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        torch.save({"model": state, "opt": laps.config.to_options(), "epoch": int(info["epoch"]),
                    "best_rsum": 0.0, "Eiters": int(info["step"])}, path)
