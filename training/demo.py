"""Re-train every demo model from scratch: ``python -m training.demo --out weights/demo``.

1. generates the synthetic benchmark (``training.synthetic``, seed 0, size ``medium``: referring scenes,
   person crops, captioned scenes; the ``test`` splits hold attribute combinations never seen in training);
2. trains a small configuration of each architecture (the recipe's ``demo`` preset: the official graph with
   smaller widths / depths / inputs, the official tokenizers) with ``training.trainer``, each within a time
   budget, on the CPU (2 threads);
3. writes ``<out>/<method>.pth`` (fp16 tensors; the service adapters load them with ``from_checkpoint``) and
   ``<out>/manifest.json``: the command, seed, data versions, the training summary and the held-out metrics of
   each model next to its chance level (``python -m training.evaluate demo`` prints them again).

On idle 2-core machines the whole run (data generation included) took 19 to 44 minutes: 31 min 20 s on an AMD EPYC
family 25 model 17 (the run that made the shipped LAPS file), 38 min 55 s on an AMD EPYC family 25 model 1 (the
shipped MagNet file, with its seventh epoch) and 38 min 10 s on that model again with the bit-for-bit speed-ups of
a later session; 26 min 45 s on an AMD EPYC family 25 model 17 with the current presets and 25 min 41 s on an Intel
Xeon family 6 model 167; the table of runs is in ``weights/demo/README.md``.
``manifest.json`` records the steps and seconds each model took, and the machine. On one machine the
run is deterministic; on another CPU the kernels round differently and the held-out figures move as much as
with another seed (``weights/demo/README.md``).
Training state (``last.pth``, metrics logs) goes to ``--work`` (default: a folder next to the data), not into ``--out``.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import multiprocessing
import os
import pickle
import platform
import shutil
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import load_checkpoint_file
from training.recipes import get_recipe
from training.synthetic import (
    CAPTION_DATASET_NAME,
    KINDS,
    PERSON_DATASET_NAME,
    REFER_DATASET_NAME,
    REFER_SPLIT_BY,
    generate_parallel,
    generator_version,
    sigterm_as_exit,
)
from training.trainer import StepContext, train

DEMO_SEED = 0
DEMO_SIZE = "medium"
METHOD_DATA: dict[str, str] = {"irra": "person", "ivt": "person", "laps": "caption", "scanformer": "refer",
                               "magnet": "refer"}
# Training seconds of each demo preset on one core while the other core trains another method, measured in one
# whole run on a 2-core AMD EPYC family 25 model 17 (27 min 55 s from scratch, MagNet with contiguous deformable-
# sampling grids); ScanFormer's is that run's 417 s times 1.75 (its width-64 preset against width 32, side by side on
# an AMD EPYC family 26 model 2) times 1.24 (width 80 against width 64 in whole runs on a family 25 model 17: 734 s
# against 591 s). ``balanced_queues`` splits the methods between the two processes with these; the caps derive
# from them.
EXPECTED_SECONDS: dict[str, float] = {"irra": 654.0, "ivt": 584.0, "laps": 585.0, "scanformer": 905.0,
                                      "magnet": 885.0}
# A safety cap on each method's training time: 2 x the expected time (the slowest machine measured, an Intel Xeon,
# took up to 1.7 times these).
# The presets' epochs normally end first, so results do not depend on the machine's load unless a run hits the cap
# (the manifest records steps and epochs, so a capped run shows).
TIME_BUDGET_S: dict[str, float] = {method: 2.0 * seconds for method, seconds in EXPECTED_SECONDS.items()}


def default_data_root(seed: int, size: str) -> Path:
    return Path.home() / ".cache" / "vls-demo" / f"synthetic-seed{seed}-{size}"


def data_versions(root: Path) -> dict[str, str]:
    out = {}
    for kind in KINDS:
        manifest = root / kind / "manifest.json"
        if manifest.exists():
            out[kind] = json.loads(manifest.read_text())["version"]
    return out


def ensure_data(root: Path | None, seed: int = DEMO_SEED, size: str = DEMO_SIZE,
                expected: dict[str, str] | None = None, jobs: int = 2) -> Path:
    """The synthetic benchmark under ``root`` (the missing kinds generated, ``jobs`` processes at a time); with
    ``expected`` the versions (content hashes) must match, so metrics are computed on the very data the manifest
    names."""
    root = Path(root) if root is not None else default_data_root(seed, size)
    have = data_versions(root)
    # a kind written by an older generator version is generated again (its data version changes with it)
    missing = [kind for kind in KINDS
               if kind not in have or not have[kind].startswith(f"synthetic-{kind}/g{generator_version(kind)}/")]
    if missing:
        print(f"generating synthetic {', '.join(missing)} data (seed {seed}, {size}) in {root}, {jobs} at a time",
              file=sys.stderr)
        generate_parallel(root, missing, seed, size, jobs=jobs)
    have = data_versions(root)
    if expected:
        wrong = {k: (have.get(k), v) for k, v in expected.items() if have.get(k) != v}
        if wrong:
            raise ValueError(f"synthetic data under {root} differs from the manifest's: {wrong}")
    return root


def synthetic_texts(kind_root: Path, kind: str) -> list[str]:
    """Every text of one synthetic kind, all splits: person descriptions, LAPS captions or referring
    expressions (both the raw and the cleaned sentence)."""
    if kind == "person":
        records = json.loads((kind_root / PERSON_DATASET_NAME / "reid_raw.json").read_text())
        return [caption for record in records for caption in record["captions"]]
    if kind == "caption":
        files = sorted((kind_root / CAPTION_DATASET_NAME).glob("*_caps.txt"))
        return [line.strip() for path in files for line in path.read_text().splitlines() if line.strip()]
    with (kind_root / REFER_DATASET_NAME / f"refs({REFER_SPLIT_BY}).p").open("rb") as handle:
        refs = pickle.load(handle)  # our own generator's file, not user input
    return [text for ref in refs for sentence in ref["sentences"] for text in (sentence["raw"], sentence["sent"])]


def compact_vocabulary(path: Path, key: str, keep_ids: set[int]) -> tuple[int, int]:
    """Zero the rows of the vocabulary table ``key`` that no text of the demo data uses (random
    initial values that never received a gradient) and rewrite the checkpoint as a deflate-compressed zip,
    which ``torch.load`` reads as it is. The BERT / CLIP vocabularies (30522 / 49408 rows) are most of a
    small model's bytes, and the synthetic texts use a few dozen of them. Returns (rows kept, rows)."""
    checkpoint = load_checkpoint_file(path)
    state = next(value for value in checkpoint.values() if isinstance(value, dict) and key in value)
    table = state[key]
    keep = torch.zeros(table.shape[0], dtype=torch.bool)
    keep[sorted(i for i in keep_ids if 0 <= i < table.shape[0])] = True
    state[key] = table * keep.unsqueeze(1).to(table.dtype)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    with zipfile.ZipFile(buffer) as source, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename))
    return int(keep.sum()), int(table.shape[0])


def machine_description() -> dict[str, Any]:
    """Where a demo model was trained: the CPU model and the kernel family PyTorch dispatched to. The same
    command rounds differently on another CPU and the held-out figures move (``weights/demo/README.md``), so
    each manifest entry records it."""
    cpu = platform.processor() or platform.machine()
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if info.get("model name"):
        # "AMD EPYC" alone names several generations; family and model tell them apart
        cpu = f"{info['model name']} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def run_method(method: str, data_root: Path, work: Path, out: Path, threads: int, time_scale: float
               ) -> tuple[str, dict[str, Any], dict[str, float]]:
    """Train one demo model from scratch, copy its checkpoint to ``out`` and evaluate it on the held-out split.
    Returns (method, manifest entry, metrics)."""
    from training.evaluate import HEADLINE, evaluate_demo_entry

    torch.set_num_threads(threads)
    recipe = get_recipe(method)
    config = recipe.config("demo")
    run_dir = work / method
    shutil.rmtree(run_dir, ignore_errors=True)  # from scratch
    kind = METHOD_DATA[method]
    texts = synthetic_texts(data_root / kind, kind)
    # only the word-table rows the synthetic texts use are trained: the same weights, 0-15% faster per step
    # (``benchmarks.demo_vocabulary_rows``)
    cap = TIME_BUDGET_S[method] * time_scale
    result = train(recipe, data_root / kind, run_dir, config, device="cpu", precision="fp32",
                   time_budget_s=cap, progress=True,
                   vocabulary_rows=recipe.vocabulary_rows(texts, config))
    target = out / f"{method}.pth"
    shutil.copyfile(result.export_path, target)
    kept, rows = compact_vocabulary(target, recipe.word_embedding_key, recipe.text_token_ids(texts, config))
    metrics = evaluate_demo_entry(method, target, data_root, by_cue=True)  # refer models: per cue too
    name, chance = HEADLINE[method]
    entry = {
        "file": target.name, "source": "demo", "config": "demo", "data": f"{kind}: {data_versions(data_root)[kind]}",
        "train": {"epochs": result.epoch, "steps": result.step, "seconds": round(result.seconds, 1),
                  "planned_epochs": config["epochs"], "stopped_at_time_cap": result.epoch < config["epochs"],
                  "last_losses": result.last_losses},
        "metric": name, "value": round(metrics[name], 2), "chance": round(metrics[chance], 2),
        "metrics": {k: round(v, 2) for k, v in metrics.items()},
        "size_bytes": target.stat().st_size, "vocabulary_rows_kept": [kept, rows],
        "machine": machine_description(),
    }
    if config.get("demo_note"):  # the preset's deviations from the official recipe
        entry["note"] = config["demo_note"]
    print(f"[demo] {method}: {name} {metrics[name]:.2f} (chance {metrics[chance]:.2f}), "
          f"{result.step} steps in {result.seconds:.0f}s", file=sys.stderr)
    if entry["train"]["stopped_at_time_cap"]:
        print(time_cap_warning(method, cap, result.epoch, int(config["epochs"]), time_scale),
              file=sys.stderr)
    return method, entry, metrics


def time_cap_warning(method: str, cap_s: float, epochs: int, planned_epochs: int, time_scale: float) -> str:
    """What to tell a user whose machine trained ``method`` too slowly to finish its epochs within the cap:
    the ``--time-scale`` that would have let it finish, from the epochs that did (rounded up to a half)."""
    if epochs:
        advice = f"--time-scale {math.ceil(2 * time_scale * planned_epochs / epochs) / 2:g} or more lets it finish"
    else:
        advice = f"not one epoch finished, so it needs a --time-scale above {time_scale * planned_epochs:g}"
    return (f"[demo] WARNING: {method} stopped at its time cap ({cap_s:.0f} s) after {epochs} of {planned_epochs} "
            f"epochs, so its figures fall short of what the preset gives. This machine trains more slowly than "
            f"the one training.demo.EXPECTED_SECONDS was measured on; {advice}.")


def prepared_batches(recipe: Any, dataset: Any, config: dict[str, Any], count: int) -> list[Any]:
    """``count`` collated batches of the preset's size, from one fixed shuffle of ``dataset`` (seed 0)."""
    size = int(config["batch_size"])
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    return [recipe.collate([dataset[i] for i in order[b * size:(b + 1) * size]], config) for b in range(count)]


def timed_training_steps(recipe: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         config: dict[str, Any], batches: list[Any], device: torch.device,
                         autocast_dtype: torch.dtype | None = None) -> tuple[float, float]:
    """One optimiser step per batch as the trainer takes it (the recipe's loss, the sum of its "loss" keys,
    backward, clipping where the preset sets a norm, the update), without scaler, logging or checkpoints:
    -> (ms per step, of which ms in the optimiser's update). Benchmarks and ``training.gpu_check`` time this."""
    clip = config.get("clip_grad_norm")
    update = 0.0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for index, batch in enumerate(batches):
        ctx = StepContext(1, index, index, len(batches), config, device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            losses = recipe.loss(model, batch, ctx)
        optimizer.zero_grad(set_to_none=True)
        sum(v for k, v in losses.items() if "loss" in k).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(clip))
        update_start = time.perf_counter()
        optimizer.step()
        update += time.perf_counter() - update_start
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1000.0 / len(batches), update * 1000.0 / len(batches)


def balanced_queues(methods: list[str], jobs: int) -> list[list[str]]:
    """Split ``methods`` into at most ``jobs`` queues, each trained one method after another by its own process,
    so that the longest queue (by ``EXPECTED_SECONDS``) is as short as possible: every assignment is tried
    (2^5 for the usual two processes). Longest-first on a shared queue could leave one process training the
    last method alone for minutes."""
    jobs = max(1, min(jobs, len(methods)))
    best: list[list[str]] = []
    best_span = float("inf")
    for assignment in itertools.product(range(jobs), repeat=len(methods)):
        queues: list[list[str]] = [[] for _ in range(jobs)]
        for method, queue in zip(methods, assignment, strict=True):
            queues[queue].append(method)
        span = max(sum(EXPECTED_SECONDS[m] for m in queue) for queue in queues)
        if span < best_span and all(queues):
            best, best_span = queues, span
    return [sorted(queue, key=lambda m: -EXPECTED_SECONDS[m]) for queue in best]


def update_manifest(path: Path, header: dict[str, Any], method: str, entry: dict[str, Any],
                    whole_run_seconds: float | None) -> None:
    """Write ``method``'s entry (and the run's ``header`` fields) into the manifest as it is on disk at this
    moment, read just before writing, and replace the file atomically: two demo runs re-training different
    methods into the same folder keep each other's entries. ``whole_run_seconds`` None marks a partial
    re-train (``--methods``): the manifest keeps the whole run's ``command`` and ``total_seconds`` (the entry
    records its own command)."""
    manifest: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    partial = whole_run_seconds is None
    manifest.update({k: v for k, v in header.items() if not (partial and k == "command" and k in manifest)})
    manifest.setdefault("models", {})[method] = entry
    if not partial:
        manifest["total_seconds"] = round(whole_run_seconds, 1)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(json.dumps(manifest, indent=1) + "\n")
    staging.replace(path)


def run_queue(methods: list[str], data_root: Path, work: Path, out: Path, threads: int, time_scale: float
              ) -> tuple[list[tuple[str, dict[str, Any], dict[str, float]]], list[tuple[str, str]]]:
    """Train ``methods`` one after another in this process; one failure does not stop the others. Returns
    (results of ``run_method``, (method, error) pairs)."""
    finished, errors = [], []
    for method in methods:
        try:
            finished.append(run_method(method, data_root, work, out, threads, time_scale))
        except Exception as exc:  # noqa: BLE001 - one failed method must not lose the others
            errors.append((method, f"{type(exc).__name__}: {exc}"))
    return finished, errors


@sigterm_as_exit()
def main(argv: list[str] | None = None) -> int:
    from training.evaluate import print_demo_table

    parser = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("weights/demo"))
    parser.add_argument("--data", type=Path, help="synthetic data root (default: a cache folder in $HOME)")
    parser.add_argument("--work", type=Path, help="training state folder (default: next to the data)")
    parser.add_argument("--methods", nargs="*", default=list(METHOD_DATA), choices=list(METHOD_DATA))
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiplies every time cap")
    parser.add_argument("--jobs", type=int, default=2, help="methods trained at once (processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    data_root = ensure_data(args.data, DEMO_SEED, DEMO_SIZE, jobs=max(1, args.jobs))
    versions = data_versions(data_root)
    work = args.work or data_root.parent / "demo-work"
    args.out.mkdir(parents=True, exist_ok=True)
    manifest_path = args.out / "manifest.json"
    command = "python -m training.demo --out weights/demo"
    extra = [f"--{k.replace('_', '-')} {v}" for k, v in (("jobs", args.jobs), ("threads", args.threads),
                                                           ("time_scale", args.time_scale))
             if v != parser.get_default(k)]
    header = {
        "command": " ".join([command, *extra]),
        "evaluate": "python -m training.evaluate demo",
        "seed": DEMO_SEED, "data_size": DEMO_SIZE, "data_versions": versions, "split": "test (held-out combinations)",
        "note": "small configurations of the official architectures trained from random weights on synthetic "
                "data; for trying the service, not for real images",
    }
    results: dict[str, dict[str, float]] = {}

    partial = set(args.methods) != set(METHOD_DATA)

    def record(method: str, entry: dict[str, Any], metrics: dict[str, float]) -> None:
        results[method] = metrics
        entry = {**entry, "command": header["command"] + " --methods " + " ".join(args.methods)
                 if partial else header["command"]}
        update_manifest(manifest_path, header, method, entry, None if partial else time.perf_counter() - started)

    queues = balanced_queues(args.methods, max(1, args.jobs))
    if len(queues) == 1:
        for method in queues[0]:
            record(*run_method(method, data_root, work, args.out, args.threads, args.time_scale))
    else:
        context = multiprocessing.get_context("spawn")
        with context.Pool(len(queues), maxtasksperchild=1) as pool:
            pending = [pool.apply_async(run_queue, (queue, data_root, work, args.out, args.threads, args.time_scale))
                       for queue in queues]
            failed = []
            for handle in pending:
                finished, errors = handle.get()
                for result in finished:
                    record(*result)
                for method, message in errors:
                    print(f"[demo] {method} failed: {message}", file=sys.stderr)
                    failed.append(method)
            if failed:
                raise SystemExit(f"demo training failed for {failed}")
    print_demo_table(results)
    print(f"total {time.perf_counter() - started:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
