"""One small training loop shared by every method; each method brings a :class:`Recipe`.

A recipe says what is method-specific: the model built from a config dict, the training dataset and its
collate, the parameter groups (official per-group learning rates / weight decay), the optimiser, the learning
rate multiplier per epoch or per step, gradient clipping, the loss (``loss(model, batch, ctx) -> {name:
tensor}``; the trainer minimises the sum of the entries whose name contains "loss", as IRRA's processor
does, and logs the others), and how to write the checkpoint the service loads
(``export``). The loop itself (:func:`train`) does the rest, the same way for all five methods:

- mixed precision on GPU (``precision="auto"``: bf16 autocast where supported, else fp16 autocast with a
  GradScaler); fp32 on CPU unless ``precision="bf16"`` is asked for;
- resumable checkpoints: ``<out>/last.pth`` holds model, optimiser, scheduler, scaler, epoch, global step,
  step within the epoch and every RNG state (python, numpy, torch, cuda). The batch order of an epoch is drawn
  from ``(seed, epoch)`` alone, so ``resume=True`` continues exactly where the run stopped: same step counter,
  same batches, same augmentation draws, the same next-step loss as a run that was never interrupted
  (with ``num_workers=0``; worker processes draw their own augmentation seeds);
- ``torchrun``: with ``WORLD_SIZE > 1`` the model is wrapped in DistributedDataParallel and each rank reads
  its shard of the epoch (``DistributedSampler``, or every ``world_size``-th index of a recipe's own order);
- tqdm progress bars and a JSONL metrics log (``<out>/metrics.jsonl``: one line per logged step and per
  epoch, with every loss term and the learning rate of each parameter group);
- after every epoch (and at the end) ``<out>/<recipe.export_name>`` is written by ``recipe.export``: the file
  the method's service adapter loads with ``from_checkpoint``.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

Config = dict[str, Any]
Batch = Any
Losses = dict[str, torch.Tensor]


# ==========================================================================================================
# What a method provides



def init_dense_layers(model: nn.Module, init_linear_weight: Callable[[nn.Linear], None]) -> None:
    """The from-scratch initialisation shared by the demo presets: ``init_linear_weight`` on every Linear, zero
    Linear biases, Embedding N(0, 0.02) (BERT / ViT), LayerNorm weight 1 and bias 0 (modules in model order)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            init_linear_weight(module)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

class TrainedRowsEmbedding(nn.Module):
    """Training-time stand-in for an ``nn.Embedding`` of which only ``rows`` are ever looked up (the demo's
    synthetic texts use a few dozen of BERT's 30522 or CLIP's 49408 rows). The parameter keeps the name
    ``weight`` (so parameter groups and the optimiser see the same names, in the same order) but holds only
    those rows, so the backward pass and the optimiser touch K rows instead of the whole table. Per row the
    arithmetic is that of full-table training, so the trained rows come out bit for bit the same (with gradient
    clipping the global norm sums the gradients in another order and could round differently; over the whole
    LAPS demo preset, clipped, it did not). The state dict
    still holds the whole ``[V, D]`` table under ``weight``; the rows outside ``rows`` keep their values (full-
    table training would only have shrunk them by weight decay; nothing reads them)."""

    def __init__(self, embedding: nn.Embedding, rows: Sequence[int]) -> None:
        super().__init__()
        if embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
            raise ValueError("TrainedRowsEmbedding stands in for a plain nn.Embedding only")
        vocabulary, _ = embedding.weight.shape
        kept = sorted({int(r) for r in rows})
        if not kept or kept[0] < 0 or kept[-1] >= vocabulary:
            raise ValueError(f"vocabulary rows must lie in [0, {vocabulary})")
        if embedding.padding_idx is not None and embedding.padding_idx not in kept:
            kept.append(embedding.padding_idx)
            kept.sort()
        index = torch.tensor(kept, dtype=torch.long, device=embedding.weight.device)
        row_of = torch.full((vocabulary,), -1, dtype=torch.long, device=index.device)
        row_of[index] = torch.arange(len(kept), device=index.device)
        self.register_buffer("rows", index, persistent=False)
        self.register_buffer("row_of", row_of, persistent=False)
        self.register_buffer("table", embedding.weight.detach().clone(), persistent=False)
        self.weight = nn.Parameter(embedding.weight.detach()[index].clone())
        self.padding_idx = None if embedding.padding_idx is None else int(row_of[embedding.padding_idx])

    @property
    def num_embeddings(self) -> int:
        return self.table.shape[0]

    def full_table(self) -> torch.Tensor:
        """The whole ``[V, D]`` table with the trained rows written in (detached)."""
        return self.table.index_copy(0, self.rows, self.weight.detach().to(self.table.dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        compact = self.row_of[ids]
        if bool((compact < 0).any()):
            unknown = sorted(set(ids[compact < 0].tolist()))[:10]
            raise ValueError(f"token ids {unknown} are outside the trained vocabulary rows")
        return nn.functional.embedding(compact, self.weight, self.padding_idx)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.full_table()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        table = state_dict[key]
        if tuple(table.shape) != tuple(self.table.shape):
            error_msgs.append(f"size mismatch for {key}: {tuple(table.shape)} in the file, "
                              f"{tuple(self.table.shape)} in the model")
            return
        with torch.no_grad():
            self.table.copy_(table)
            self.weight.copy_(table[self.rows.to(table.device)])


def train_only_vocabulary_rows(model: nn.Module, table_key: str, rows: Sequence[int]) -> str:
    """Replace the ``nn.Embedding`` whose weight is ``table_key`` (an exported state-dict key; the training
    model may hold it under a prefix, e.g. MagNet's ``magnet.``) by a :class:`TrainedRowsEmbedding` of
    ``rows``. Returns the module's name in ``model``."""
    found = [name for name, module in model.named_modules()
             if isinstance(module, nn.Embedding) and f"{name}.weight".endswith(table_key)]
    if len(found) != 1:
        raise ValueError(f"expected one nn.Embedding whose weight ends with {table_key!r}, found {found}")
    parent_name, _, child = found[0].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, TrainedRowsEmbedding(getattr(parent, child), rows))
    return found[0]


@dataclass
class StepContext:
    """Where the loop is, for losses that depend on it (LAPS's first-epoch warm-up, schedules in losses)."""

    epoch: int  # 0-based
    step: int  # global optimiser steps done before this one
    step_in_epoch: int  # 0-based index of this batch in its epoch
    steps_per_epoch: int
    config: Config
    device: torch.device


class Recipe:
    """Everything method-specific about training. Subclasses override what differs from these defaults.

    ``configs`` maps a preset name (``"official"``, ``"demo"``, ...) to a config dict; keys the trainer reads
    itself: ``epochs``, ``batch_size``, ``clip_grad_norm`` (None = no clipping), ``num_workers``,
    ``log_every``, ``save_every`` (steps; 0 = only at epoch ends), ``seed``, ``epoch_samples`` (optional: an
    epoch is the first N samples of its shuffled order).
    """

    name: str = ""
    schedule_unit: str = "epoch"  # "epoch": the multiplier is stepped once per epoch; "step": once per step
    export_name: str = "model.pth"
    ddp_find_unused_parameters: bool = True  # parameters outside the loss (unused heads) need it under DDP
    configs: dict[str, Config] = {}
    word_embedding_key: str = ""  # the exported state dict's vocabulary table (``training.demo`` compacts it)

    # -- configuration
    def config(self, preset: str = "official", **overrides: Any) -> Config:
        if preset not in self.configs:
            raise ValueError(f"{self.name}: unknown config preset {preset!r}; known: {sorted(self.configs)}")
        config = json.loads(json.dumps(self.configs[preset]))  # a deep copy
        unknown = sorted(set(overrides) - set(config))
        if unknown:
            raise ValueError(f"{self.name}: unknown config keys {unknown}; known: {sorted(config)}")
        config.update(overrides)
        config["preset"] = preset
        return config

    # -- model and data
    def build_model(self, config: Config) -> nn.Module:
        raise NotImplementedError

    def train_dataset(self, data_dir: Path, config: Config) -> Dataset:
        """Called before ``build_model``; it may fill in config values read off the data (class counts)."""
        raise NotImplementedError

    def collate(self, samples: list[Any], config: Config) -> Batch:
        return torch.utils.data.default_collate(samples)

    def epoch_order(self, dataset: Dataset, config: Config, seed: int, epoch: int) -> list[int] | None:
        """The epoch's sample order; None means a plain shuffle seeded by (seed, epoch)."""
        return None

    # -- optimisation
    def param_groups(self, model: nn.Module, config: Config) -> list[dict[str, Any]]:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def optimizer(self, groups: list[dict[str, Any]], config: Config) -> torch.optim.Optimizer:
        return torch.optim.AdamW(groups, lr=config["lr"], weight_decay=config.get("weight_decay", 0.0))

    def lr_multiplier(self, config: Config, steps_per_epoch: int) -> Callable[[int], float]:
        """``f(i)``: the factor on every group's initial lr at epoch i (or step i, see ``schedule_unit``)."""
        return lambda i: 1.0

    # -- loss and output
    def loss(self, model: nn.Module, batch: Batch, ctx: StepContext) -> Losses:
        raise NotImplementedError

    def export(self, model: nn.Module, path: Path, config: Config, info: dict[str, Any]) -> None:
        """Write the file the service adapter loads (``from_checkpoint``)."""
        raise NotImplementedError

    def text_token_ids(self, texts: list[str], config: Config) -> set[int]:
        """Every row of the vocabulary table that ``texts`` use: BERT WordPiece ids, [CLS] / [SEP] / [PAD]
        included (IRRA overrides it with CLIP's BPE)."""
        from models.tokenizers import bert_tokenizer

        tokenizer = bert_tokenizer()
        ids = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id}
        for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            ids.update(encoded)
        return ids

    def vocabulary_rows(self, texts: list[str], config: Config) -> set[int] | None:
        """The rows of the word table that training on ``texts`` with ``config`` can look up (for
        ``train(vocabulary_rows=...)``), or None when any row can be (a text corruption that draws random
        vocabulary tokens). By default the rows of the texts themselves."""
        return self.text_token_ids(texts, config)


class TrainStep(nn.Module):
    """Wraps the model so that DistributedDataParallel sees the recipe's loss as the module's forward."""

    def __init__(self, recipe: Recipe, model: nn.Module):
        super().__init__()
        self.recipe = recipe
        self.model = model

    def forward(self, batch: Batch, ctx: StepContext) -> Losses:  # noqa: D102
        return self.recipe.loss(self.model, batch, ctx)


# ==========================================================================================================
# Helpers


def move_to(batch: Any, device: torch.device) -> Any:
    """Tensors anywhere in nested dicts / lists / tuples go to ``device``; everything else is kept."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [move_to(v, device) for v in batch]
    if isinstance(batch, tuple):
        return tuple(move_to(v, device) for v in batch)
    return batch


def rng_state() -> dict[str, Any]:
    """Every RNG the loop, the augmentations and the models draw from, in a weights_only-loadable form."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class DistInfo:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """``torchrun`` sets WORLD_SIZE / RANK / LOCAL_RANK; one process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(world_size, int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    return info


def use_foreach_updates(optimizer: torch.optim.Optimizer) -> None:
    """Update all parameters of a group with PyTorch's multi-tensor (``foreach``) kernels instead of one Python
    loop iteration per parameter. PyTorch picks them by default on GPU only; on the CPU they give the same
    numbers bit for bit (tested) with less per-parameter overhead (hundreds of tensors in MagNet / IRRA)."""
    for group in optimizer.param_groups:
        if "foreach" in group and group["foreach"] is None:
            group["foreach"] = True


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a GradScaler). ``auto``: bf16 on a GPU that has it, fp16 + scaler on an
    older GPU, fp32 on CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return None, False
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp32":
        return None, False
    if precision == "bf16":
        return torch.bfloat16, False
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError("fp16 autocast needs a GPU; use bf16 or fp32 on CPU")
        return torch.float16, True
    raise ValueError(f"precision must be auto, fp32, bf16 or fp16, not {precision!r}")


class JsonlLog:
    """Appends one JSON object per line (main rank only)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ==========================================================================================================
# The loop


@dataclass
class TrainResult:
    out_dir: Path
    epoch: int  # epochs completed
    step: int  # optimiser steps completed
    export_path: Path
    last_losses: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def _epoch_batches(recipe: Recipe, dataset: Dataset, config: Config, seed: int, epoch: int, batch_size: int,
                   dist_info: DistInfo) -> list[list[int]]:
    order = recipe.epoch_order(dataset, config, seed, epoch)
    if order is None:
        if dist_info.enabled:
            sampler = DistributedSampler(dataset, dist_info.world_size, dist_info.rank, shuffle=True, seed=seed,
                                         drop_last=True)
            sampler.set_epoch(epoch)
            order = list(sampler)
        else:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(len(dataset), generator=generator).tolist()  # type: ignore[arg-type]
    elif dist_info.enabled:
        usable = len(order) // dist_info.world_size * dist_info.world_size
        order = order[dist_info.rank:usable:dist_info.world_size]
    if config.get("epoch_samples"):  # a shorter "epoch": the first N of the shuffled order (short demo runs)
        order = order[: int(config["epoch_samples"]) // dist_info.world_size]
    return [list(b) for b in BatchSampler(order, batch_size, drop_last=True)]


def _iterate(dataset: Dataset, batches: Sequence[list[int]], collate: Callable[[list[Any]], Batch],
             num_workers: int, seed: int) -> Iterator[Batch]:
    if num_workers <= 0:  # in-process: augmentation draws from the restored global RNGs (exact resume)
        for indices in batches:
            yield collate([dataset[i] for i in indices])
        return
    loader = DataLoader(dataset, batch_sampler=list(batches), collate_fn=collate, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(seed), persistent_workers=False)
    yield from loader


def train(
    recipe: Recipe,
    data_dir: str | Path,
    out_dir: str | Path,
    config: Config | None = None,
    *,
    epochs: int | None = None,
    max_steps: int | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    precision: str = "auto",
    seed: int | None = None,
    progress: bool = True,
    time_budget_s: float | None = None,
    vocabulary_rows: Sequence[int] | None = None,
) -> TrainResult:
    """Train ``recipe`` on ``data_dir``; checkpoints, the metrics log and the exported model go to ``out_dir``.

    ``epochs`` overrides ``config["epochs"]``; ``max_steps`` stops after that many optimiser steps in total
    (a checkpoint is written there, so a later ``resume=True`` call continues); ``time_budget_s`` stops at
    the end of the first step past the budget in the same way. ``vocabulary_rows`` (the token ids training can
    look up, ``recipe.vocabulary_rows`` of every text of the data) trains only those rows of the recipe's word table
    (:class:`TrainedRowsEmbedding`): the same result, faster where the table is most of the parameters.
    """
    started = time.perf_counter()
    config = dict(config if config is not None else recipe.config("official"))
    if epochs is not None:
        config["epochs"] = int(epochs)
    seed = int(config.get("seed", 0) if seed is None else seed)
    config["seed"] = seed
    dist_info = init_distributed()
    if device is None:
        device = f"cuda:{dist_info.local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    amp_dtype, use_scaler = resolve_precision(precision, device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    last_path = out_dir / "last.pth"
    log = JsonlLog(out_dir / "metrics.jsonl", enabled=dist_info.is_main)

    seed_everything(seed + dist_info.rank)
    dataset = recipe.train_dataset(Path(data_dir), config)  # may complete the config (e.g. class counts)
    model = recipe.build_model(config).to(device)
    if vocabulary_rows is not None:
        train_only_vocabulary_rows(model, recipe.word_embedding_key, vocabulary_rows)
    optimizer = recipe.optimizer(recipe.param_groups(model, config), config)
    batch_size = int(config["batch_size"])
    steps_per_epoch = len(_epoch_batches(recipe, dataset, config, seed, 0, batch_size, dist_info))
    if steps_per_epoch == 0:
        raise ValueError(f"{recipe.name}: {len(dataset)} training samples give no batch of {batch_size}")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, recipe.lr_multiplier(config, steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    epoch, step, step_in_epoch = 0, 0, 0
    if resume and last_path.exists():
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        if state["recipe"] != recipe.name:
            raise ValueError(f"{last_path} was written by the {state['recipe']!r} recipe, not {recipe.name!r}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        epoch, step, step_in_epoch = int(state["epoch"]), int(state["step"]), int(state["step_in_epoch"])
        set_rng_state(state["rng"][min(dist_info.rank, len(state["rng"]) - 1)])
        if progress and dist_info.is_main:
            print(f"[{recipe.name}] resumed from {last_path}: epoch {epoch}, step {step}")
    use_foreach_updates(optimizer)

    train_step: nn.Module = TrainStep(recipe, model)
    if dist_info.enabled:
        train_step = nn.parallel.DistributedDataParallel(
            train_step, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=recipe.ddp_find_unused_parameters)

    def save(reason: str) -> None:
        rng_states: list[Any] = [rng_state()]
        if dist_info.enabled:
            gathered: list[Any] = [None] * dist_info.world_size
            dist.all_gather_object(gathered, rng_states[0])
            rng_states = gathered
        if not dist_info.is_main:
            return
        payload = {
            "recipe": recipe.name, "config": config, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch, "step": step, "step_in_epoch": step_in_epoch, "rng": rng_states, "reason": reason,
        }
        tmp = last_path.with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, last_path)

    def export() -> Path:
        path = out_dir / recipe.export_name
        if dist_info.is_main:
            recipe.export(model, path, config, {"epoch": epoch, "step": step, "recipe": recipe.name})
        return path

    total_epochs = int(config["epochs"])
    clip = config.get("clip_grad_norm")
    log_every = int(config.get("log_every", 10))
    save_every = int(config.get("save_every", 0))
    num_workers = int(config.get("num_workers", 0))
    last_losses: dict[str, float] = {}
    stopped = max_steps is not None and step >= max_steps  # resumed at or past the limit: nothing to do
    while epoch < total_epochs and not stopped:
        epoch_batches = _epoch_batches(recipe, dataset, config, seed, epoch, batch_size, dist_info)
        epoch_steps = len(epoch_batches)  # a recipe's own order (identity sampler) may vary per epoch
        batches = epoch_batches[step_in_epoch:]
        model.train()
        bar = tqdm(total=epoch_steps, initial=step_in_epoch, desc=f"{recipe.name} epoch {epoch + 1}/{total_epochs}",
                   disable=not (progress and dist_info.is_main), unit="step", dynamic_ncols=True)
        sums: dict[str, float] = {}
        count = 0
        for batch in _iterate(dataset, batches, lambda s: recipe.collate(s, config), num_workers,
                              seed * 7919 + epoch * 104729 + step_in_epoch):
            ctx = StepContext(epoch, step, step_in_epoch, epoch_steps, config, device)
            batch = move_to(batch, device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                losses = train_step(batch, ctx)
            total = sum(v for k, v in losses.items() if "loss" in k)  # as IRRA's processor: keys with "loss"
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            grad_norm = None
            if clip:
                scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip)))
            scaler.step(optimizer)
            scaler.update()
            step += 1
            step_in_epoch += 1
            if recipe.schedule_unit == "step":
                scheduler.step()
            last_losses = {k: float(v.detach()) for k, v in losses.items()}
            last_losses["loss"] = float(total.detach())
            for k, v in last_losses.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            bar.update(1)
            bar.set_postfix(loss=f"{last_losses['loss']:.4f}")
            if step % log_every == 0 or step_in_epoch == epoch_steps:
                record = {"kind": "step", "epoch": epoch, "step": step, **last_losses,
                          "lr": [g["lr"] for g in optimizer.param_groups], "time": time.perf_counter() - started}
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                log.write(record)
            if not math.isfinite(last_losses["loss"]):
                raise FloatingPointError(f"{recipe.name}: loss became {last_losses['loss']} at step {step}")
            out_of_time = time_budget_s is not None and time.perf_counter() - started > time_budget_s
            if dist_info.enabled and time_budget_s is not None:  # every rank must stop at the same step
                flag = torch.tensor([float(out_of_time)], device=device if device.type == "cuda" else "cpu")
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                out_of_time = bool(flag.item())
            if (max_steps is not None and step >= max_steps) or out_of_time:
                stopped = True
                break
            if save_every and step % save_every == 0:
                save("save_every")
        bar.close()
        if step_in_epoch >= epoch_steps:
            epoch += 1
            step_in_epoch = 0
            if recipe.schedule_unit == "epoch":
                scheduler.step()
            log.write({"kind": "epoch", "epoch": epoch, "step": step,
                       **{f"mean_{k}": v / max(count, 1) for k, v in sums.items()},
                       "lr": [g["lr"] for g in optimizer.param_groups], "time": time.perf_counter() - started})
        save("max_steps" if stopped else "epoch")
        export()
    if dist_info.enabled:
        dist.barrier()
    return TrainResult(out_dir, epoch, step, out_dir / recipe.export_name, last_losses,
                       time.perf_counter() - started)


# ==========================================================================================================
# Schedules used by the recipes (multipliers on each group's initial lr)


def warmup_cosine(warmup: int, total: int, warmup_factor: float = 0.1, target: float = 0.0) -> Callable[[int], float]:
    """IRRA ``LRSchedulerWithWarmup`` (mode cosine, linear warm-up), at index i = epoch - 1:
    ``wf (1 - a) + a`` with ``a = i / warmup`` during warm-up, then ``t + (1 - t) (1 + cos(pi (i - W) /
    (T - W))) / 2``."""

    def factor(i: int) -> float:
        if i < warmup:
            alpha = i / warmup
            return warmup_factor * (1 - alpha) + alpha
        span = max(total - warmup, 1)
        return target + (1 - target) * 0.5 * (1 + math.cos(math.pi * (i - warmup) / span))

    return factor


def timm_cosine(warmup: int, t_initial: int, warmup_init: float, lr_min: float) -> Callable[[int], float]:
    """timm ``CosineLRScheduler`` as IVT sets it (relative to the base lr): linear from ``warmup_init`` for
    ``warmup`` epochs, then ``lr_min + (1 - lr_min) (1 + cos(pi t / t_initial)) / 2`` (no warm-up prefix);
    ``lr_min`` after ``t_initial``."""

    def factor(t: int) -> float:
        if t < warmup:
            return warmup_init + t * (1 - warmup_init) / warmup
        if t >= t_initial:
            return lr_min
        return lr_min + (1 - lr_min) * 0.5 * (1 + math.cos(math.pi * t / t_initial))

    return factor


def step_decay(milestones: Sequence[int], rate: float) -> Callable[[int], float]:
    """LAPS: ``lr * rate^(number of milestones <= epoch)`` (decay at the start of those epochs)."""
    return lambda epoch: rate ** sum(1 for m in milestones if epoch >= m)


def poly(total_steps: int, power: float = 0.9) -> Callable[[int], float]:
    """LAVT / MagNet: ``(1 - step / total) ^ 0.9`` per iteration."""
    return lambda step: max(0.0, 1 - step / max(total_steps, 1)) ** power


def linear_warmup_decay(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """ViLT fine-tuning: linear warm-up then linear decay to 0, per step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        return max(0.0, (total_steps - step) / max(total_steps - warmup_steps, 1))

    return factor


def group_by(model: nn.Module, settings_of: Callable[[str], dict[str, Any]]) -> list[dict[str, Any]]:
    """Parameter groups from a per-name rule: every trainable parameter gets ``settings_of(name)`` (e.g.
    ``{"lr": ..., "weight_decay": ...}``); parameters with equal settings share one group, in first-seen order.
    Each group records its ``param_names``."""
    grouped: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        settings = settings_of(name)
        key = json.dumps(settings, sort_keys=True)
        if key not in grouped:
            grouped[key] = {**settings, "params": [], "param_names": []}
        grouped[key]["params"].append(param)
        grouped[key]["param_names"].append(name)
    return list(grouped.values())
