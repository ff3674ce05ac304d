"""IRRA training recipe (anosorae/IRRA ``train.py`` defaults, research notes section 4).

- Data: ``ImageTextMLMDataset`` - (image, caption, pid) with ``--img_aug`` augmentation and the MLM corruption
  (15% of the tokens; 80% mask / 10% random / 10% kept). QUIRK kept by default: the official dataset edits
  the tokenised caption in place, so SDM and ID see the *masked* caption (``caption_ids_are_masked``; switch
  it off with ``masked_caption_quirk=False``).
- Loss: SDM (scale 1 / temperature = 50) + ID + MLM, each weight 1 (``model/build.py``).
- Optimiser: Adam, lr 1e-5, betas (0.9, 0.999), eps 1e-3, coupled L2 weight decay 4e-5; per-parameter rules
  of ``solver/build.py`` in order: "cross" in the name -> lr x5; then "bias" -> lr x2 and no weight decay
  (overriding the cross rule); then "classifier" / "mlm_head" -> lr x5 (their biases keep wd 0).
- Schedule: per epoch, linear warm-up 5 epochs from 0.1, then cosine to 0 at epoch 60.
- The official run keeps fp16 parameters without loss scaling; here parameters stay fp32 (autocast on GPU).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from models.clip_tokenizer import irra_tokenizer
from models.irra import (
    IRRA,
    IRRAConfig,
    compute_id,
    compute_itc,
    compute_mlm,
    compute_sdm,
    image_global_feature,
    text_global_feature,
)
from training.datasets import (
    PersonTrainDataset,
    TextCache,
    identity_epoch_order,
    image_reader,
    irra_mlm_mask,
    irra_train_transform,
    read_person_annotations,
)
from training.trainer import Batch, Config, Losses, Recipe, StepContext, group_by, warmup_cosine

OFFICIAL: Config = {
    "image_cache_mb": 0,  # MB of decoded images held in memory per data process (0: read every time)
    "dataset": "CUHK-PEDES", "epochs": 60, "batch_size": 64, "num_workers": 0, "log_every": 50, "save_every": 0,
    "seed": 1, "clip_grad_norm": None,
    "model": IRRAConfig().to_dict(),
    "lr": 1e-5, "betas": [0.9, 0.999], "eps": 1e-3, "weight_decay": 4e-5, "weight_decay_bias": 0.0,
    "bias_lr_factor": 2.0, "lr_factor": 5.0, "warmup_epochs": 5, "warmup_factor": 0.1, "target_lr": 0.0,
    "img_aug": True, "masked_caption_quirk": True, "sdm_weight": 1.0, "id_loss_weight": 1.0,
    "mlm_loss_weight": 1.0, "export_fp16": False, "export_training_heads": True,
    "sampler": "random", "num_instance": 4,  # official options: "identity" = num_instance items of each id a batch
    "shared_colour_fraction": 0.0,  # demo only, sampler "identity": share of a batch's ids with its first id's colours
}

# Small CLIP towers (image: ViT layout at 96x32 with 8x8 patches -> 12x4 patches, width 128, 4 layers, 2 heads;
# text: width 32, 3 layers, 1 head; trained files record the head counts), synthetic data. Deviations from the
# official recipe, all because the towers start from random weights instead of CLIP:
# - lr 3e-4 (official 1e-5) with a 1-epoch warm-up at 0.1 x lr, cosine over 14 epochs (3500 steps; about
#   0.17 s each on one idle CPU thread: about 10 min);
# - Adam eps 1e-8: the official 1e-3 goes with fp16 weights; with fp32 weights it stalls Adam from scratch;
# - losses SDM + ITC + ID, no MLM: SDM (+ ID) alone sat at chance for hundreds of steps (text and image features
#   of every sample nearly equal at init); adding the InfoNCE term (IRRA's own "itc" option) gets out of it, and
#   dropping MLM (the cross-modal encoder, unused at retrieval) makes a step about 4x cheaper;
# - no image augmentation (img_aug False): Pad(10) + RandomCrop and RandomErasing up to 40% of a 96x32 crop remove
#   the small parts (shoes, hat, bag) the descriptions name.
# Held-out R@1 (person generator 2, 11 epochs unless said): width 96 / 1 head / 16 px patches 26.8; 8 px patches
# 33.3; width 128 with 2 heads 43.3 (4 heads 43.8, width 192 with 3 heads 44.3); 2 layers 32.3, 4 layers 47.9,
# 6 layers 45.1; 4 layers and 14 epochs 52.6. In-distribution val R@1 is about 77 at 11 epochs: the gap is the
# image tower carrying clothing details over to colour pairs never seen in training.
# The held-out identities share 8 (upper, lower) colour pairs, so R@1 there turns on the other details; a random
# batch seldom holds two identities of one pair. As for IVT, the demo draws batches with IRRA's own identity
# sampler (``sampler`` "identity") and the aid ``shared_colour_fraction`` 0.5: half of each batch's identities
# wear its first identity's colours. Side by side on an Intel Xeon family 6 model 167 (AVX-512), same steps and
# time, held-out R@1 for seeds 0 / 1 / 2: random batches (the preset before) 46.25 / 44.12 / -; 8 identities x 4
# items 51.88 / 53.38 / 46.75; 16 identities x 2 items (``num_instance`` 2, kept) 59.38 / 51.00 / 57.00.
DEMO: Config = {
    **OFFICIAL, "image_cache_mb": 1024,  # the demo data fits decoded in memory
    "epochs": 14, "batch_size": 32, "log_every": 10, "seed": 0, "lr": 3e-4, "warmup_epochs": 1,
    "eps": 1e-8, "img_aug": False, "sampler": "identity", "num_instance": 2, "shared_colour_fraction": 0.5,
    "model": {**IRRAConfig().to_dict(), "embed_dim": 64, "image_size": [96, 32], "patch_size": 8, "stride_size": 8,
              "vision_width": 128, "vision_layers": 4, "vision_heads": 2, "text_width": 32, "text_layers": 3,
              "text_heads": 1, "cmt_depth": 1, "cross_heads": 1, "loss_names": "sdm+itc+id"},
    "export_fp16": True, "export_training_heads": False,
    "demo_note": "from random weights (no CLIP); image tower width 128, 4 layers, 2 heads, 8 px patches at 96x32; "
                 "text tower width 32, 3 layers; embed 64; losses SDM + ITC + ID (no MLM); Adam lr 3e-4, eps "
                 "1e-8, 1-epoch warm-up at 0.1 x lr, cosine over 14 epochs, batch 32 (IRRA's identity sampler, 16 ids "
                 "x 2), 8 of the 16 ids sharing the first one's clothing colours (shared_colour_fraction 0.5, a demo "
                 "training aid); no image augmentation; fp16 export without the training heads; person data "
                 "generator 2 (plain scenes)",
}

TINY: Config = {
    **DEMO, "epochs": 1, "batch_size": 8, "lr": 1e-3, "warmup_epochs": 0, "img_aug": True,  # tests: every loss
    "model": {**DEMO["model"], "loss_names": IRRAConfig().loss_names, "image_size": [48, 16], "patch_size": 16,
              "stride_size": 16, "vision_width": 64,
              "vision_layers": 1, "vision_heads": 1, "text_width": 32, "text_layers": 1, "embed_dim": 32,
              "cmt_depth": 1, "cross_heads": 1, "context_length": 32},
}


class IRRARecipe(Recipe):
    name = "irra"
    schedule_unit = "epoch"
    export_name = "irra.pth"
    word_embedding_key = "base_model.token_embedding.weight"
    ddp_find_unused_parameters = False  # every parameter is in SDM + ID + MLM
    configs = {"official": OFFICIAL, "demo": DEMO, "tiny": TINY}

    def model_config(self, config: Config) -> IRRAConfig:
        return IRRAConfig.from_dict(config["model"])

    def text_token_ids(self, texts: list[str], config: Config) -> set[int]:
        """CLIP BPE ids (SOT, EOT and the zero padding included) at the model's context length."""
        tokens = irra_tokenizer(self.model_config(config).context_length)(texts)
        return {int(i) for i in np.unique(tokens)}

    def vocabulary_rows(self, texts: list[str], config: Config) -> set[int] | None:
        """None with MLM: its 10% random replacements can draw any token."""
        return None if "mlm" in self.model_config(config).tasks else self.text_token_ids(texts, config)

    def build_model(self, config: Config) -> nn.Module:
        return IRRA(self.model_config(config))

    def train_dataset(self, data_dir: Path, config: Config) -> PersonTrainDataset:
        annotations = read_person_annotations(data_dir, config["dataset"])
        config["model"]["num_classes"] = annotations.num_classes  # the ID classifier covers the train ids
        model_config = self.model_config(config)
        tokenizer = irra_tokenizer(model_config.context_length)
        mlm = (lambda ids: irra_mlm_mask(ids, random)) if "mlm" in model_config.tasks else None
        return PersonTrainDataset(
            annotations.train, irra_train_transform(tuple(model_config.image_size), config["img_aug"]),
            tokenize=TextCache(lambda text: torch.from_numpy(tokenizer([text])[0]).long(), copy=torch.clone),
            mlm=mlm, caption_ids_are_masked=bool(config["masked_caption_quirk"]),
            image_reader=image_reader(config.get("image_cache_mb", 0)),
        )

    def epoch_order(self, dataset: Dataset, config: Config, seed: int, epoch: int) -> list[int] | None:
        """``sampler random``: the trainer's shuffle; ``identity``: IRRA's ``RandomIdentitySampler`` (batches of
        ``batch_size // num_instance`` identities with ``num_instance`` items each)."""
        if config["sampler"] == "random":
            return None
        if config["sampler"] != "identity":
            raise ValueError(f"sampler is 'random' or 'identity', not {config['sampler']!r}")
        return identity_epoch_order(dataset.samples, int(config["batch_size"]),  # type: ignore[attr-defined]
                                    int(config["num_instance"]), seed, epoch,
                                    float(config.get("shared_colour_fraction", 0.0)))

    def collate(self, samples: list[dict[str, Any]], config: Config) -> Batch:
        batch = {"images": torch.stack([s["image"] for s in samples]),
                 "caption_ids": torch.stack([s["caption_ids"] for s in samples]),
                 "pids": torch.tensor([s["pid"] for s in samples], dtype=torch.long)}
        if "mlm_ids" in samples[0]:
            batch["mlm_ids"] = torch.stack([s["mlm_ids"] for s in samples])
            batch["mlm_labels"] = torch.stack([s["mlm_labels"] for s in samples])
        return batch

    def param_groups(self, model: nn.Module, config: Config) -> list[dict[str, Any]]:
        base, wd = config["lr"], config["weight_decay"]

        def settings(name: str) -> dict[str, Any]:  # solver/build.py, rule order kept
            lr, decay = base, wd
            if "cross" in name:
                lr = base * config["lr_factor"]
            if "bias" in name:
                lr, decay = base * config["bias_lr_factor"], config["weight_decay_bias"]
            if "classifier" in name or "mlm_head" in name:
                lr = base * config["lr_factor"]
            return {"lr": lr, "weight_decay": decay}

        return group_by(model, settings)

    def optimizer(self, groups: list[dict[str, Any]], config: Config) -> torch.optim.Optimizer:
        return torch.optim.Adam(groups, lr=config["lr"], betas=tuple(config["betas"]), eps=config["eps"])

    def lr_multiplier(self, config: Config, steps_per_epoch: int) -> Any:
        return warmup_cosine(config["warmup_epochs"], config["epochs"], config["warmup_factor"], config["target_lr"])

    def loss(self, model: nn.Module, batch: Batch, ctx: StepContext) -> Losses:
        """``model/build.py`` forward: SDM and ID on the global features of ``caption_ids`` (the masked caption
        under the quirk), MLM through the cross-modal encoder. The vocabulary head is evaluated only at the
        labelled positions: the official loss ignores every other position (``ignore_index=0``), so the value
        and the gradients are the same, at a sixth of the cost."""
        cfg = ctx.config
        irra: IRRA = model  # type: ignore[assignment]
        images, caption_ids, pids = batch["images"], batch["caption_ids"], batch["pids"]
        image_tokens = irra.base_model.encode_image(images)
        text_tokens = irra.base_model.encode_text(caption_ids)
        i_feats = image_global_feature(image_tokens)
        t_feats = text_global_feature(text_tokens, caption_ids)
        tasks = irra.config.tasks
        out: Losses = {}
        if "sdm" in tasks:
            out["sdm_loss"] = cfg["sdm_weight"] * compute_sdm(i_feats, t_feats, pids, irra.logit_scale)
        if "itc" in tasks:
            out["itc_loss"] = compute_itc(i_feats, t_feats, irra.logit_scale)
        if "id" in tasks:
            image_logits, text_logits = irra.id_logits(i_feats), irra.id_logits(t_feats)
            out["id_loss"] = cfg["id_loss_weight"] * compute_id(image_logits, text_logits, pids)
            out["img_acc"] = (image_logits.argmax(dim=1) == pids).float().mean()
            out["txt_acc"] = (text_logits.argmax(dim=1) == pids).float().mean()
        if "mlm" in tasks:
            mlm_ids, labels = batch["mlm_ids"], batch["mlm_labels"]
            same = mlm_ids.shape == caption_ids.shape and torch.equal(mlm_ids, caption_ids)
            mlm_tokens = text_tokens if same else irra.base_model.encode_text(mlm_ids)
            fused = irra.cross_former(mlm_tokens, image_tokens, image_tokens)
            labelled = labels != 0
            scores = irra.mlm_head(fused[labelled]).float()
            out["mlm_loss"] = cfg["mlm_loss_weight"] * compute_mlm(scores, labels[labelled])
            out["mlm_acc"] = (scores.argmax(dim=1) == labels[labelled]).float().mean()
        return out

    def export(self, model: nn.Module, path: Path, config: Config, info: dict[str, Any]) -> None:
        """The official file layout (``{'model': state_dict, 'epoch': ...}``); the demo stores fp16 tensors and
        leaves out the training-only heads (classifier, IRR), which retrieval never uses."""
        state = model.state_dict()
        if not config["export_training_heads"]:
            state = {k: v for k, v in state.items() if k.startswith("base_model.")}
        if config["export_fp16"]:
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        heads = {"vision": model.config.vision_heads, "text": model.config.text_heads,
                 "cross": model.config.cross_heads}  # not in official files (their rule: width // 64)
        torch.save({"model": {k: v.detach().cpu().clone() for k, v in state.items()}, "epoch": info["epoch"],
                    "iteration": info["step"], "heads": heads}, path)
