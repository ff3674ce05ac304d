"""The training module's GPU checks, for a machine with CUDA (the CPU test suite covers everything else).

Usage: ``python -m training.gpu_check --out DIR [--device cuda] [--steps-timed 10] [--scanformer-epochs 0]``

1. Each recipe's tiny preset on the tiny synthetic data, with mixed precision (``precision="auto"``: bf16
   autocast on a GPU that has it, else fp16 with a GradScaler): the loss on a fixed batch falls, a run stopped
   at step 2 and resumed to step 4 logs the losses of a straight run to step 4 (within 1e-5, or ten times what
   two straight runs differ by: CUDA's grid-sampler backward, in MagNet, sums with atomics in no fixed order),
   and the exported file loads in the service's adapter on the device and answers a request.
2. Each demo preset on the medium synthetic data: ms per training step, fp32 against the automatic mixed precision
   (median of three runs of ``--steps-timed`` steps on the same prepared batches).
3. With ``--scanformer-epochs N``: ScanFormer's demo preset trained N epochs on the device, then its held-out
   Acc@0.5 (how far the preset gets when the epoch budget is not the CPU's).

It prints one line per check and exits non-zero when a check of part 1 fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from training.demo import METHOD_DATA, ensure_data, prepared_batches, timed_training_steps
from training.recipes import get_recipe
from training.synthetic import generate_caption, generate_person, generate_refer
from training.trainer import StepContext, move_to, read_jsonl, resolve_precision, seed_everything, train

# Steps of each tiny preset after which its fixed-batch loss must have fallen, here and in tests/test_training.py
# (IVT's 30: CMPM from random weights leaves its plateau slowly).
TINY_STEPS = {"irra": 12, "ivt": 30, "laps": 40, "scanformer": 30, "magnet": 12}


def fixed_batch_loss(method: str, config: dict[str, Any], data: Path, state: dict[str, Any] | None,
                     device: torch.device) -> float:
    """The recipe's fp32 loss on the first samples of the training set, every random draw fixed (also the CPU
    suite's measure of a falling loss)."""
    recipe = get_recipe(method)
    config = dict(config)
    dataset = recipe.train_dataset(data, config)
    seed_everything(int(config["seed"]))
    model = recipe.build_model(config)
    if state is not None:
        model.load_state_dict(state)
    model.to(device).train()
    seed_everything(1234)
    batch = recipe.collate([dataset[i] for i in range(int(config["batch_size"]))], config)
    batch = move_to(batch, device)
    seed_everything(1234)
    ctx = StepContext(epoch=1, step=0, step_in_epoch=0, steps_per_epoch=1, config=config, device=device)
    with torch.no_grad():
        losses = recipe.loss(model, batch, ctx)
    return float(sum(v for k, v in losses.items() if "loss" in k))


def check_tiny(method: str, data: Path, out: Path, device: torch.device) -> list[str]:
    """Part 1 for one method; returns the failures."""
    failures = []
    recipe = get_recipe(method)
    config = {**recipe.config("tiny"), "epochs": 100, "log_every": 1}
    kind = METHOD_DATA[method]
    steps = TINY_STEPS[method]
    result = train(recipe, data / kind, out / "falls", config, max_steps=steps, device=device, progress=False)
    state = torch.load(out / "falls" / "last.pth", weights_only=True)
    before = fixed_batch_loss(method, state["config"], data / kind, None, device)
    after = fixed_batch_loss(method, state["config"], data / kind, state["model"], device)
    dtype, scaler = resolve_precision("auto", device)
    precision = f"{dtype} autocast{' + GradScaler' if scaler else ''}" if dtype else "fp32"
    print(f"{method}: {result.step} steps in {precision}: fixed-batch loss "
          f"{before:.4f} -> {after:.4f}", flush=True)
    if not after < before:
        failures.append(f"{method}: loss did not fall ({before} -> {after})")

    for name in ("straight", "again"):
        train(recipe, data / kind, out / name, config, max_steps=4, device=device, progress=False)
    train(recipe, data / kind, out / "resumed", config, max_steps=2, device=device, progress=False)
    resumed = train(recipe, data / kind, out / "resumed", config, max_steps=4, resume=True, device=device,
                    progress=False)
    losses = {name: {r["step"]: r["loss"] for r in read_jsonl(out / name / "metrics.jsonl") if r["kind"] == "step"}
              for name in ("straight", "again", "resumed")}
    gap = max(abs(losses["straight"][s] - losses["resumed"].get(s, float("inf"))) for s in (3, 4))
    spread = max(abs(losses["straight"][s] - losses["again"][s]) for s in (3, 4))
    print(f"{method}: resumed at step 2, steps 3-4 differ from a straight run by {gap:.2e} (two straight runs: "
          f"{spread:.2e})", flush=True)
    if sorted(losses["resumed"]) != [1, 2, 3, 4] or gap > max(1e-5, 10 * spread):
        failures.append(f"{method}: resume did not continue the straight run (gap {gap}, spread {spread})")

    from service.registry import adapter_class

    adapter, task = adapter_class(method)
    served = adapter.from_checkpoint(str(resumed.export_path), device=str(device), precision="fp32")
    image = Image.new("RGB", (48, 96), (200, 30, 30))
    if task == "search":
        answer = tuple(served.encode_texts(["a person in a red shirt"]).shape)
    elif task == "ground":
        answer = served.ground(image, ["the red circle"])[0]["box_xyxy"]
    else:
        answer = served.segment(image, ["the red circle"])[0].shape
    print(f"{method}: the export loads in the service on {device}: {answer}", flush=True)
    return failures


def step_ms(method: str, root: Path, device: torch.device, precision: str, steps: int) -> float:
    """Median ms per demo-preset training step (loss, backward, clipping, optimiser step) over three runs."""
    recipe = get_recipe(method)
    config = copy.deepcopy(recipe.config("demo"))
    dataset = recipe.train_dataset(root / METHOD_DATA[method], config)
    batches = move_to(prepared_batches(recipe, dataset, config, steps), device)
    seed_everything(0)
    model = recipe.build_model(config).to(device).train()
    optimizer = recipe.optimizer(recipe.param_groups(model, config), config)
    dtype = resolve_precision(precision, device)[0]
    times = [timed_training_steps(recipe, model, optimizer, config, batches, device, dtype)[0] for _ in range(4)]
    return statistics.median(times[1:])  # the first run warms up the allocator and kernels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", nargs="+", default=sorted(METHOD_DATA), choices=sorted(METHOD_DATA),
                        help="part 1's recipes")
    parser.add_argument("--steps-timed", type=int, default=10, help="0 skips part 2")
    parser.add_argument("--scanformer-epochs", type=int, default=0)
    parser.add_argument("--workers", type=int, default=8, help="data-loading processes for part 3")
    parser.add_argument("--scanformer-budget-s", type=float, default=None, help="time cap of part 3's training")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)

    tiny = args.out / "tiny-data"
    generate_person(tiny / "person", seed=0, size="tiny", progress=False)
    generate_caption(tiny / "caption", seed=0, size="tiny", progress=False)
    generate_refer(tiny / "refer", seed=0, size="tiny", progress=False)
    failures = []
    for method in args.methods:
        failures += check_tiny(method, tiny, args.out / method, device)

    root = ensure_data(None, jobs=3) if args.steps_timed or args.scanformer_epochs else Path()
    if args.steps_timed:
        print(f"{'demo preset':<11} {'fp32 ms/step':>12} {'auto ms/step':>12} {'ratio':>6}", flush=True)
    for method in sorted(METHOD_DATA) if args.steps_timed else []:
        fp32 = step_ms(method, root, device, "fp32", args.steps_timed)
        mixed = step_ms(method, root, device, "auto", args.steps_timed)
        print(f"{method:<11} {fp32:>12.1f} {mixed:>12.1f} {fp32 / mixed:>6.2f}", flush=True)

    if args.scanformer_epochs:
        from training.evaluate import evaluate_demo_entry

        recipe = get_recipe("scanformer")
        config = {**recipe.config("demo"), "num_workers": args.workers}
        start = time.perf_counter()
        result = train(recipe, root / "refer", args.out / "scanformer-long", config, epochs=args.scanformer_epochs,
                       device=device, progress=False, time_budget_s=args.scanformer_budget_s)
        seconds = time.perf_counter() - start
        metrics = evaluate_demo_entry("scanformer", result.export_path, root, device=str(device), by_cue=True)
        print(f"scanformer demo preset, {result.epoch} of {args.scanformer_epochs} epochs ({result.step} steps) on "
              f"{device} in {seconds:.0f} s: "
              f"{json.dumps({k: round(v, 2) for k, v in metrics.items()})}", flush=True)

    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
