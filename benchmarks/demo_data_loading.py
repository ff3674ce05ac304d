"""Data loading of each demo training preset, reading every image from disk against the in-memory caches.

Usage: ``python -m benchmarks.demo_data_loading [--batches 20] [--repeats 5] [--methods scanformer laps]
[--data DIR]``

For each method it builds the demo preset's training dataset on the synthetic demo data (``training.demo``'s
cache folder; generated there first if missing) three times: with ``image_cache_mb = 0`` (every image read and
decoded from disk, as the official presets do), with decoded images and tokenised captions held in memory
(``training.datasets.DecodedImageCache`` / ``TextCache``) but ``resized_cache_mb = 0``, and as the preset has it
(ScanFormer's also keeps its resized images as tensors, ``training.datasets.ResizedImageCache``; for the others
the last two are the same). It times building ``--batches`` batches (``__getitem__`` of each sample + the
recipe's ``collate``, one thread), the cached datasets after one untimed pass over the same samples (a later
epoch, when every image is cached). They are measured in turn, ``--repeats`` times, and the medians are printed
per batch, with the ratios.
Training results are the same either way (``tests/test_training.py``); only the time differs.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from training.demo import DEMO_SEED, DEMO_SIZE, METHOD_DATA, ensure_data
from training.recipes import get_recipe


def batch_ms(recipe: Any, dataset: Any, config: dict[str, Any], indices: list[list[int]]) -> float:
    """Wall-clock ms per batch of building ``indices``' batches."""
    start = time.perf_counter()
    for batch in indices:
        recipe.collate([dataset[i] for i in batch], config)
    return (time.perf_counter() - start) * 1000.0 / len(indices)


def demo_benchmark_setup(module: str, description: str, count: str, default: int,
                         argv: list[str] | None) -> tuple[argparse.Namespace, Path]:
    """The command line the demo benchmarks share (``--methods``, ``--<count>``, ``--repeats``, ``--data``),
    one torch thread, and the synthetic demo data root (generated there first if missing)."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument("--methods", nargs="+", default=["irra", "ivt", "laps", "magnet", "scanformer"])
    parser.add_argument(f"--{count}", type=int, default=default)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", type=Path, help="synthetic demo data root (default: training.demo's cache)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    return args, ensure_data(args.data, DEMO_SEED, DEMO_SIZE)


def main(argv: list[str] | None = None) -> int:
    args, root = demo_benchmark_setup("benchmarks.demo_data_loading", __doc__.split("\n")[0], "batches", 20, argv)
    print(f"{'method':<11} {'batch':>5} {'from disk ms':>12} {'decoded ms':>10} {'preset ms':>9} "
          f"{'disk/preset':>11} {'decoded/preset':>14}")
    for method in args.methods:
        recipe = get_recipe(method)
        preset = copy.deepcopy(recipe.config("demo"))
        configs = {"disk": {**copy.deepcopy(preset), "image_cache_mb": 0, "resized_cache_mb": 0},
                   "decoded": {**copy.deepcopy(preset), "resized_cache_mb": 0}, "preset": preset}
        size = int(preset["batch_size"])
        data_dir = root / METHOD_DATA[method]
        datasets = {name: recipe.train_dataset(data_dir, config) for name, config in configs.items()}
        order = torch.randperm(len(datasets["disk"]), generator=torch.Generator().manual_seed(0)).tolist()
        indices = [order[i * size:(i + 1) * size] for i in range(args.batches)]
        for name in ("decoded", "preset"):  # fill the caches: the epochs after the first
            batch_ms(recipe, datasets[name], configs[name], indices)
        times: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(args.repeats):
            for name in configs:
                times[name].append(batch_ms(recipe, datasets[name], configs[name], indices))
        med = {name: statistics.median(values) for name, values in times.items()}
        print(f"{method:<11} {size:>5} {med['disk']:>12.1f} {med['decoded']:>10.1f} {med['preset']:>9.1f} "
              f"{med['disk'] / med['preset']:>11.2f} {med['decoded'] / med['preset']:>14.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
