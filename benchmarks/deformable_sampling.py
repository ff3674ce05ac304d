"""MagNet's deformable sampling with contiguous grids against the strided per-level grids it used before.

Usage: ``python -m benchmarks.deformable_sampling [--steps 5] [--repeats 5] [--data DIR]``

``models.deformable_attention.deformable_sample`` hands ``F.grid_sample`` one level of the sampling grid at a
time. Sliced out of the (B*heads, Q, levels, points, 2) grid that slice is strided, and PyTorch's CPU grid sampler
then runs its generic per-point kernel; made contiguous first, it runs the vectorised one. The samples are the
same bit for bit (the served masks are compared here); the gradient of the sampled values is summed in
another order, so it rounds differently. One thread, side by side, the two alternately, ``--repeats`` times:

- a request: one 480-px ``MagNetSegmenter.segment`` call of the full-size model (crc32 parity fill, as
  ``benchmarks.magnet_latency``), seconds; the masks must be equal;
- a demo step: one MagNet demo training step (loss, backward, clipping, optimiser step) on prepared batches, as
  ``training.demo`` trains it (one model per layout), ``--steps`` per measurement, ms per step.

It prints the medians and their ratios.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.demo_data_loading import demo_benchmark_setup
from benchmarks.demo_vocabulary_rows import Trainee
from benchmarks.magnet_latency import DEFAULT_FIXTURES, build_segmenter, request_image
from training.demo import prepared_batches, synthetic_texts
from training.recipes import get_recipe


@contextlib.contextmanager
def strided_grids() -> Iterator[None]:
    """Within the block every grid reaches ``F.grid_sample`` as a strided view holding the same values (the
    layout of the per-level slice ``deformable_sample`` passed before)."""
    contiguous_sampler = F.grid_sample

    def sample_with_strided_grid(value: torch.Tensor, grid: torch.Tensor, *args: Any, **kwargs: Any
                                 ) -> torch.Tensor:
        wide = grid.new_empty(*grid.shape[:-1], 2 * grid.shape[-1])
        view = wide[..., :grid.shape[-1]]
        view.copy_(grid)
        assert not view.is_contiguous()
        return contiguous_sampler(value, view, *args, **kwargs)

    F.grid_sample = sample_with_strided_grid
    try:
        yield
    finally:
        F.grid_sample = contiguous_sampler


def side_by_side(strided_run: Callable[[], Any], contiguous_run: Callable[[], Any], repeats: int
                 ) -> tuple[float, float, list[tuple[Any, Any]]]:
    """Median seconds of ``repeats`` alternating calls of each (the first under ``strided_grids``), after one
    warm-up call each (allocator, lazily built kernels), and each repeat's pair of results."""
    times: tuple[list[float], list[float]] = ([], [])
    pairs = []
    for repeat in range(repeats + 1):
        results = []
        for index, run in enumerate((strided_run, contiguous_run)):
            with strided_grids() if index == 0 else contextlib.nullcontext():
                start = time.perf_counter()
                results.append(run())
                if repeat:
                    times[index].append(time.perf_counter() - start)
        if repeat:
            pairs.append((results[0], results[1]))
    return statistics.median(times[0]), statistics.median(times[1]), pairs


def main(argv: list[str] | None = None) -> int:
    args, root = demo_benchmark_setup("benchmarks.deformable_sampling", __doc__.split("\n")[0], "steps", 5, argv)
    print(f"{'what':<26} {'strided grids':>13} {'contiguous':>10} {'ratio':>6}")

    segmenter = build_segmenter(None, "fp32")
    image = request_image(DEFAULT_FIXTURES)

    def serve() -> np.ndarray:
        return segmenter.segment(image, ["the man on the left wearing a red shirt"])[0]

    strided, contiguous, pairs = side_by_side(serve, serve, args.repeats)
    if not all(np.array_equal(a, b) for a, b in pairs):
        raise AssertionError("the two grid layouts gave different masks")
    print(f"{'480-px request, s':<26} {strided:>13.3f} {contiguous:>10.3f} {strided / contiguous:>6.2f}", flush=True)

    recipe = get_recipe("magnet")
    config = copy.deepcopy(recipe.config("demo"))
    dataset = recipe.train_dataset(root / "refer", config)
    rows = recipe.vocabulary_rows(synthetic_texts(root / "refer", "refer"), config)
    batches = prepared_batches(recipe, dataset, config, args.steps)
    strided_trainee, contiguous_trainee = Trainee(recipe, config, rows), Trainee(recipe, config, rows)
    strided, contiguous, _ = side_by_side(lambda: strided_trainee.step_ms(batches),
                                          lambda: contiguous_trainee.step_ms(batches), args.repeats)
    steps = len(batches)
    print(f"{'MagNet demo step, ms':<26} {1000 * strided / steps:>13.1f} {1000 * contiguous / steps:>10.1f} "
          f"{strided / contiguous:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
