"""LAPS exact scorer: vectorised block scorer vs the per-pair reference loop, on the same synthetic inputs.

Usage: ``python -m benchmarks.laps_scorer [--config vit swin] [--images 1000] [--captions 5000]
[--loop-pairs-per-chunk 40] [--threads N] [--device cpu|cuda]``

Inputs are synthetic projected features at the released sizes (no backbone runs: the scorer only sees
features): ViT config N=196 patches + CLS, C=512, K=98 kept, Nc=39 aggregated; Swin config N=49, no CLS,
K=40, Nc=23. Patches and words are N(0, 1) plus a shared direction (trained features share one, which keeps
cosines realistic); caption lengths (with [CLS]/[SEP]) are 2 + Poisson(12), clipped to 4..60, and the first
caption has 95 tokens (capped at 90). The aggregation MLP is filled by the parity rule (crc32-normal-v1).

The vectorised scorer (``score_matrix``: on the CPU ``score_block_delta``, which scores each pair as a text-free
base set of kept patches plus a correction over the ~20 patches the caption moves across the K-th place) scores all
images x captions on ``--threads`` cores (default: all), as ``--workers`` Python threads with one torch thread each,
like the evaluation CLI (``--workers 1``: torch's intra-op threads, as the service scores). The per-pair loop
(``score_pair_reference``: gather, MLP on the kept patches, softmax, bmm, as the official code per pair) runs on a
subset, interleaved with the vectorised image chunks so both see the same machine load; its rate is extrapolated to
the full matrix; it runs on one thread (its ops are tiny: a second thread only adds synchronisation, which costs
whole scheduler slices when the machine is busy). ``--loop-threads`` changes that. A third baseline is the official
evaluation strategy (``score_matrix_per_caption``: a loop over captions, each against a 256-image shard at once), on
min(images, 256) x ``--official-captions``. The script prints the rates (pairs/s), the ratios, the largest score
differences, and peak memory: the scorer's working-set increase over the stored states (peak RSS during scoring,
reset through ``/proc/self/clear_refs``, minus RSS before; ``max_memory_allocated`` on CUDA) next to the states' own
size. """

from __future__ import annotations

import argparse
import resource
import time
from dataclasses import dataclass

import numpy as np
import torch

from models.laps import LapsConfig, TokenAggregation
from models.laps_scoring import (
    LapsCaptionState,
    LapsImageState,
    score_matrix,
    score_matrix_per_caption,
    score_pair_reference,
)
from models.parity import crc32_normal_fill


@dataclass
class SyntheticInputs:
    images: LapsImageState
    captions: LapsCaptionState
    aggr: TokenAggregation
    keep_k: int


def make_inputs(backbone: str, num_images: int, num_captions: int, seed: int = 0,
                device: str = "cpu") -> SyntheticInputs:
    config = LapsConfig.released(backbone)
    dim, n = config.embed_size, config.num_patches
    aggr = TokenAggregation(dim, config.num_aggregated)
    with torch.no_grad():
        for name, tensor in aggr.state_dict(keep_vars=True).items():
            tensor.data.copy_(torch.from_numpy(crc32_normal_fill(f"cross_net.aggr_net.{name}", tensor.shape)))
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(dim, generator=gen)
    patches = torch.randn(num_images, n, dim, generator=gen) + 0.7 * common
    cls = torch.randn(num_images, dim, generator=gen) + 0.7 * common if backbone == "vit" else None
    rng = np.random.default_rng(seed)
    lengths = np.clip(2 + rng.poisson(12, num_captions), 4, 60)
    lengths[0] = 95
    words = torch.randn(num_captions, int(lengths.max()), dim, generator=gen) + 0.5 * common
    with torch.no_grad():
        images = LapsImageState(patches=patches, cls=cls, aggr_logits=aggr.logits(patches))
        captions = LapsCaptionState.from_embeddings(words, torch.from_numpy(lengths), config.max_word)
    return SyntheticInputs(images.to(device), captions.to(device), aggr.to(device), config.keep_k)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5), so VmHWM covers the scoring only."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _state_bytes(inputs: SyntheticInputs) -> int:
    img, cap = inputs.images, inputs.captions
    tensors = [img.patches, img.patches_norm, img.aggr_logits, img.self_score, cap.words_norm, cap.global_norm]
    return sum(t.numel() * t.element_size() for t in tensors)


def run_config(backbone: str, args: argparse.Namespace) -> dict[str, float]:
    device = args.device
    inputs = make_inputs(backbone, args.images, args.captions, args.seed, device)
    num_img, num_cap = len(inputs.images), len(inputs.captions)
    rng = np.random.default_rng(args.seed + 1)
    chunk = args.image_chunk * args.workers  # images per interleaving step (each worker scores image_chunk)
    scores = torch.empty(num_img, num_cap, dtype=torch.float32, device=device)
    loop_pairs: list[tuple[int, int, float]] = []
    vec_time = loop_time = 0.0
    vec_rates: list[float] = []  # per image chunk, for medians
    loop_rates: list[float] = []
    # warm-up of all three paths: first-call allocations, thread pools, and the one-off kernel set-up of every
    # new matrix shape (10-40 ms each on CPU), i.e. one caption of every length for the loops
    score_matrix(inputs.images.select(slice(0, 2)), inputs.captions.select(slice(0, 64)), inputs.keep_k)
    lengths = inputs.captions.lengths.cpu().numpy()
    one_per_length = [int(np.flatnonzero(lengths == n)[0]) for n in np.unique(lengths)]
    official_images = inputs.images.select(slice(0, min(num_img, 256)))
    official_captions = inputs.captions.select(slice(0, args.official_captions))
    with torch.no_grad():
        for t in one_per_length:
            score_pair_reference(inputs.images, 0, inputs.captions, t, inputs.keep_k, inputs.aggr.weight,
                                 inputs.aggr.scale)
    score_matrix_per_caption(official_images, inputs.captions.select(one_per_length), inputs.keep_k,
                             inputs.aggr.weight, inputs.aggr.scale)
    cuda_before = 0
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    rss_before = _rss_bytes()
    if not _reset_peak_rss():
        print("  (cannot reset the peak-RSS mark: the peak below may include input generation)")
    for i0 in range(0, num_img, chunk):
        block = inputs.images.select(slice(i0, min(i0 + chunk, num_img)))
        start = time.perf_counter()
        scores[i0:i0 + len(block)] = score_matrix(block, inputs.captions, inputs.keep_k,
                                                  image_chunk=args.image_chunk, workers=args.workers)
        if device == "cuda":
            torch.cuda.synchronize()
        vec_time += time.perf_counter() - start
        vec_rates.append(len(block) * num_cap / (time.perf_counter() - start))
        # the loop on a few pairs of this chunk, under the same load; the first calls after the big block pay
        # for the allocator re-mapping the memory the block freed (page faults), so 5 untimed calls go first
        i = int(rng.integers(i0, i0 + len(block)))
        picks = rng.choice(num_cap, size=args.loop_pairs_per_chunk + 5, replace=False)
        threads = torch.get_num_threads()
        torch.set_num_threads(args.loop_threads)  # per-pair ops are tiny: one thread is fastest
        with torch.no_grad():
            for t in picks[:5]:
                score_pair_reference(inputs.images, i, inputs.captions, int(t), inputs.keep_k, inputs.aggr.weight,
                                     inputs.aggr.scale)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for t in picks[5:]:
                value = score_pair_reference(inputs.images, i, inputs.captions, int(t), inputs.keep_k,
                                             inputs.aggr.weight, inputs.aggr.scale)
                loop_pairs.append((i, int(t), value))
        if device == "cuda":
            torch.cuda.synchronize()
        loop_time += time.perf_counter() - start
        loop_rates.append(args.loop_pairs_per_chunk / (time.perf_counter() - start))
        torch.set_num_threads(threads)
        done = min(i0 + chunk, num_img)
        print(f"  {backbone}: {done}/{num_img} images, vectorised {done * num_cap / vec_time:,.0f} pairs/s, "
              f"loop {len(loop_pairs) / loop_time:,.1f} pairs/s", flush=True)
    if device == "cuda":
        peak_extra = torch.cuda.max_memory_allocated() - cuda_before
    else:
        peak_extra = max(0, _peak_rss_bytes() - rss_before)
    # the official strategy (per-caption loop over a 256-image shard) on a subset, after the main run
    start = time.perf_counter()
    official = score_matrix_per_caption(official_images, official_captions, inputs.keep_k, inputs.aggr.weight,
                                        inputs.aggr.scale)
    official_time = time.perf_counter() - start
    official_diff = float((official.to(device) - scores[: len(official_images), : len(official_captions)]).abs().max())
    loop_index = torch.tensor([(i, t) for i, t, _ in loop_pairs], device=device)
    loop_values = torch.tensor([v for _, _, v in loop_pairs], device=device)
    max_diff = float((scores[loop_index[:, 0], loop_index[:, 1]] - loop_values).abs().max())
    vec_rate = num_img * num_cap / vec_time
    loop_rate = len(loop_pairs) / loop_time
    return {
        "pairs": num_img * num_cap, "vec_seconds": vec_time, "vec_rate": vec_rate, "loop_pairs": len(loop_pairs),
        "loop_rate": loop_rate, "loop_extrapolated_seconds": num_img * num_cap / loop_rate,
        "ratio": vec_rate / loop_rate, "max_diff": max_diff, "peak_extra_mib": peak_extra / 2**20,
        "state_mib": _state_bytes(inputs) / 2**20,
        "official_pairs": official.numel(), "official_rate": official.numel() / official_time,
        "official_diff": official_diff,
        "vec_median": float(np.median(vec_rates)), "loop_median": float(np.median(loop_rates)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", nargs="+", default=["vit", "swin"], choices=["vit", "swin"])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--captions", type=int, default=5000)
    parser.add_argument("--image-chunk", type=int, default=8)
    parser.add_argument("--loop-threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=None,
                        help="score_matrix workers: Python threads with one torch thread each (default: --threads, "
                             "as the evaluation CLI does; 1 = torch's intra-op threads)")
    parser.add_argument("--loop-pairs-per-chunk", type=int, default=40)
    parser.add_argument("--official-captions", type=int, default=40,
                        help="captions for the official-strategy baseline (x min(images, 256))")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.workers is None:
        args.workers = args.threads
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"LAPS scorer benchmark: {args.images} images x {args.captions} captions, device {args.device}, "
          f"{args.threads} threads, torch {torch.__version__}")
    rows = []
    for backbone in args.config:
        rows.append((backbone, run_config(backbone, args)))
    print()
    print("config | pairs | vectorised pairs/s | loop pairs/s (pairs timed) | ratio | max |diff| | "
          "scorer peak extra MiB | states MiB")
    for backbone, r in rows:
        print(f"{backbone} | {r['pairs']:,} | {r['vec_rate']:,.0f} ({r['vec_seconds']:.0f} s) | "
              f"{r['loop_rate']:,.1f} ({r['loop_pairs']}; the full matrix: ~{r['loop_extrapolated_seconds']:,.0f} s)"
              f" | {r['ratio']:.1f}x | {r['max_diff']:.2e} | {r['peak_extra_mib']:.0f} | {r['state_mib']:.0f}")
    print()
    print("config | median over image chunks: vectorised pairs/s | loop pairs/s | ratio of medians")
    for backbone, r in rows:
        ratio = r["vec_median"] / r["loop_median"]
        print(f"{backbone} | {r['vec_median']:,.0f} | {r['loop_median']:,.1f} | {ratio:.1f}x")
    print()
    print("config | official strategy (per-caption loop, 256-image shard) pairs/s (pairs) | vectorised / it | "
          "max |diff|")
    for backbone, r in rows:
        speedup = r["vec_rate"] / r["official_rate"]
        print(f"{backbone} | {r['official_rate']:,.0f} ({r['official_pairs']:,}) | {speedup:.1f}x"
              f" | {r['official_diff']:.2e}")


if __name__ == "__main__":
    main()
