"""Training step of each demo preset with the whole word table trained against only the rows the texts use.

Usage: ``python -m benchmarks.demo_vocabulary_rows [--steps 10] [--repeats 5] [--methods magnet ivt]
[--data DIR]``

The demo models carry BERT's 30522-row or CLIP's 49408-row word table, of which the synthetic texts use a few
dozen rows. Training the whole table makes every step compute a dense ``[V, D]`` gradient and run the
optimiser over it; ``training.trainer.TrainedRowsEmbedding`` (what ``training.demo`` uses) trains only the
used rows, with the same result on those rows bit for bit (``tests/test_training.py``). For each method this
builds the demo preset's model twice from the same seed (whole table / used rows only) and times one training
step (the recipe's loss, backward, the preset's gradient clipping, the optimiser step; one thread) on the same
prepared batches, ``--steps`` steps per measurement, the two alternately, ``--repeats`` times. It prints the
medians per step and their ratio.
"""

from __future__ import annotations

import copy
import statistics
from typing import Any

import torch

from benchmarks.demo_data_loading import demo_benchmark_setup
from training.demo import METHOD_DATA, prepared_batches, synthetic_texts, timed_training_steps
from training.recipes import get_recipe
from training.trainer import train_only_vocabulary_rows


class Trainee:
    """One model with its optimiser, stepping through prepared batches."""

    def __init__(self, recipe: Any, config: dict[str, Any], rows: set[int] | None) -> None:
        torch.manual_seed(0)
        self.recipe, self.config = recipe, config
        self.model = recipe.build_model(config)
        self.table_name = None if rows is None else train_only_vocabulary_rows(self.model,
                                                                                recipe.word_embedding_key, rows)
        self.model.train()
        self.optimizer = recipe.optimizer(recipe.param_groups(self.model, config), config)
        self.update_ms = 0.0  # the optimiser steps' share of the last step_ms, per step

    def step_ms(self, batches: list[Any]) -> float:
        step, self.update_ms = timed_training_steps(self.recipe, self.model, self.optimizer, self.config, batches,
                                                    torch.device("cpu"))
        return step


def main(argv: list[str] | None = None) -> int:
    args, root = demo_benchmark_setup("benchmarks.demo_vocabulary_rows", __doc__.split("\n")[0], "steps", 10, argv)
    print(f"{'method':<11} {'rows used':>9} {'of':>6} {'whole table ms':>14} {'used rows ms':>12} {'ratio':>6}")
    for method in args.methods:
        recipe = get_recipe(method)
        config = copy.deepcopy(recipe.config("demo"))
        kind = METHOD_DATA[method]
        dataset = recipe.train_dataset(root / kind, config)
        rows = recipe.vocabulary_rows(synthetic_texts(root / kind, kind), config)  # what training.demo trains
        if rows is None:
            print(f"{method:<11} (its demo preset draws random tokens: the whole table is trained)")
            continue
        batches = prepared_batches(recipe, dataset, config, args.steps)
        whole, used = Trainee(recipe, config, None), Trainee(recipe, config, rows)
        vocabulary = used.model.get_submodule(used.table_name).num_embeddings
        whole.step_ms(batches[:2])  # warm-up: allocator, lazily built kernels
        used.step_ms(batches[:2])
        whole_times, used_times = [], []
        for _ in range(args.repeats):
            whole_times.append(whole.step_ms(batches))
            used_times.append(used.step_ms(batches))
        whole_ms, used_ms = statistics.median(whole_times), statistics.median(used_times)
        print(f"{method:<11} {len(rows):>9} {vocabulary:>6} {whole_ms:>14.1f} {used_ms:>12.1f} "
              f"{whole_ms / used_ms:>6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
