"""Train one method: ``python -m training.train <method> --data DIR --out DIR [--config demo|official]
[--epochs N] [--resume]``.

``--data`` is the dataset root in the official layout the recipe reads (person search: the folder holding
``CUHK-PEDES/``; LAPS: the folder holding ``<dataset>/{split}_caps.txt``; refer: the refer API data root).
``--set key=value`` overrides any config entry (JSON values; ``model.key=value`` for model settings).
Multi-GPU: ``torchrun --nproc_per_node N -m training.train ...``. Writes ``last.pth`` (resumable state),
``metrics.jsonl`` and the service-loadable checkpoint to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from training.recipes import RECIPES, get_recipe
from training.trainer import train


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values parsed as JSON when possible (numbers, lists, true/false/null)."""
    out: dict[str, Any] = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key] = value
    return out


def apply_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for key, value in overrides.items():
        target = config
        parts = key.split(".")
        for part in parts[:-1]:
            target = target[part]
        if parts[-1] not in target:
            raise SystemExit(f"unknown config key {key!r}")
        target[parts[-1]] = value
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0])
    parser.add_argument("method", choices=sorted(RECIPES))
    parser.add_argument("--data", type=Path, required=True, help="dataset root (official layout)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (checkpoints, metrics.jsonl)")
    parser.add_argument("--config", default="official", help="config preset: official, demo or tiny")
    parser.add_argument("--epochs", type=int, help="number of epochs (default: the preset's)")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimiser steps in total")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last.pth")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--seed", type=int)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = get_recipe(args.method)
    config = apply_overrides(recipe.config(args.config), parse_overrides(args.overrides))
    result = train(recipe, args.data, args.out, config, epochs=args.epochs, max_steps=args.max_steps,
                   resume=args.resume, device=args.device, precision=args.precision, seed=args.seed,
                   progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(json.dumps({"method": args.method, "epochs": result.epoch, "steps": result.step,
                      "checkpoint": str(result.export_path), "last_losses": result.last_losses,
                      "seconds": round(result.seconds, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
