"""Data loading of each demo training preset, reading every image from disk against the in-memory caches.

Usage: ``python -m benchmarks.demo_data_loading [--batches 20] [--repeats 5] [--methods scanformer laps]
[--data DIR]``

For each method it builds the demo preset's training dataset on the synthetic demo data (``training.demo``'s
cache folder; generated there first if missing) twice: with ``image_cache_mb = 0`` (every image read and
decoded from disk, as the official presets do) and with the preset's cache (decoded images and tokenised
captions held in memory, ``training.datasets.DecodedImageCache`` / ``TextCache``). It times building
``--batches`` batches (``__getitem__`` of each sample + the recipe's ``collate``, one thread), the cached
dataset after one untimed pass over the same samples (a later epoch, when every image is cached). The two
are measured alternately, ``--repeats`` times, and the medians are printed per batch, with their ratio.
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
    print(f"{'method':<11} {'batch':>5} {'from disk ms':>12} {'cached ms':>10} {'ratio':>6}")
    for method in args.methods:
        recipe = get_recipe(method)
        cached_config = copy.deepcopy(recipe.config("demo"))
        disk_config = {**copy.deepcopy(cached_config), "image_cache_mb": 0}
        size = int(cached_config["batch_size"])
        data_dir = root / METHOD_DATA[method]
        disk = recipe.train_dataset(data_dir, disk_config)
        cached = recipe.train_dataset(data_dir, cached_config)
        order = torch.randperm(len(disk), generator=torch.Generator().manual_seed(0)).tolist()
        indices = [order[i * size:(i + 1) * size] for i in range(args.batches)]
        batch_ms(recipe, cached, cached_config, indices)  # fill the caches: the epochs after the first
        disk_times, cached_times = [], []
        for _ in range(args.repeats):
            disk_times.append(batch_ms(recipe, disk, disk_config, indices))
            cached_times.append(batch_ms(recipe, cached, cached_config, indices))
        disk_ms, cached_ms = statistics.median(disk_times), statistics.median(cached_times)
        print(f"{method:<11} {size:>5} {disk_ms:>12.1f} {cached_ms:>10.1f} {disk_ms / cached_ms:>6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
