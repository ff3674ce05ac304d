"""Optimiser updates of each demo preset, one Python iteration per parameter against multi-tensor kernels.

Usage: ``python -m benchmarks.demo_optimizer_updates [--steps 10] [--repeats 5] [--methods magnet irra]
[--data DIR]``

On the CPU PyTorch's Adam / AdamW / SGD loop over the parameters in Python unless ``foreach`` is set; the
trainer sets it (``training.trainer.use_foreach_updates``), which gives the same weights bit for bit
(``tests/test_training.py``). For each method this builds the demo preset's model twice from the same seed, as
``training.demo`` trains it (used word-table rows only), one optimiser per-parameter and one multi-tensor, and
times whole training steps (loss, backward, clipping, optimiser step; one thread) and the optimiser step alone on
the same prepared batches, ``--steps`` steps per measurement, the two alternately, ``--repeats`` times. It prints
the medians per step and their ratios.
"""

from __future__ import annotations

import copy
import statistics

from benchmarks.demo_data_loading import demo_benchmark_setup
from benchmarks.demo_vocabulary_rows import Trainee
from training.demo import METHOD_DATA, prepared_batches, synthetic_texts
from training.recipes import get_recipe
from training.trainer import use_foreach_updates


def main(argv: list[str] | None = None) -> int:
    args, root = demo_benchmark_setup("benchmarks.demo_optimizer_updates", __doc__.split("\n")[0], "steps", 10,
                                      argv)
    print(f"{'method':<11} {'tensors':>7} {'loop step ms':>12} {'foreach step ms':>15} {'ratio':>6} "
          f"{'loop update ms':>14} {'foreach update ms':>17} {'ratio':>6}")
    for method in args.methods:
        recipe = get_recipe(method)
        config = copy.deepcopy(recipe.config("demo"))
        kind = METHOD_DATA[method]
        dataset = recipe.train_dataset(root / kind, config)
        rows = recipe.vocabulary_rows(synthetic_texts(root / kind, kind), config)
        batches = prepared_batches(recipe, dataset, config, args.steps)
        loop, multi = Trainee(recipe, config, rows), Trainee(recipe, config, rows)
        use_foreach_updates(multi.optimizer)
        tensors = sum(len(group["params"]) for group in loop.optimizer.param_groups)
        for trainee in (loop, multi):
            trainee.step_ms(batches[:2])  # warm-up: allocator, lazily built kernels, optimiser state
        times: dict[str, list[float]] = {"loop": [], "multi": [], "loop_update": [], "multi_update": []}
        for _ in range(args.repeats):
            for name, trainee in (("loop", loop), ("multi", multi)):
                times[name].append(trainee.step_ms(batches))
                times[f"{name}_update"].append(trainee.update_ms)
        med = {name: statistics.median(values) for name, values in times.items()}
        print(f"{method:<11} {tensors:>7} {med['loop']:>12.1f} {med['multi']:>15.1f} "
              f"{med['loop'] / med['multi']:>6.2f} {med['loop_update']:>14.1f} {med['multi_update']:>17.1f} "
              f"{med['loop_update'] / med['multi_update']:>6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
