"""Per-image IVT image-encode latency on this machine: stride 12 and 16, fp32 and bf16 autocast.

Usage: ``python -m benchmarks.ivt_encode [--repeats 7] [--warmup 2] [--batch-sizes 1 8] [--threads N]``

Random weights (latency does not depend on the values). For each setting it times ``IVT.encode_image`` as
the service adapter runs it (``torch.inference_mode()``; bf16 = autocast with the Linear/Conv weights stored
in bf16) on already-preprocessed 384x128 pixels and prints the median over ``--repeats`` runs after
``--warmup`` runs, per batch and per image (wall clock), plus the median process CPU time per image (all
threads). On an idle machine cpu ~ threads x wall; wall well above cpu / threads means other jobs were taking
the cores, and the wall times are inflated. A ``svc1`` row times the whole service path
(``IVTRetrievalModel.encode_images``: PIL resize + normalise + encode + L2-normalise) for one image.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from models.ivt import IVT, IVTConfig, IVTRetrievalModel, autocast_context


def median_ms(run: Callable[[], object], repeats: int, warmup: int) -> tuple[float, float]:
    """Median wall-clock ms and median process CPU ms (all threads) of ``run``."""
    for _ in range(warmup):
        run()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        wall.append((time.perf_counter() - start) * 1000.0)
        cpu.append((time.process_time() - start_cpu) * 1000.0)
    return statistics.median(wall), statistics.median(cpu)


def encode_ms(model: IVT, pixels: torch.Tensor, precision: str, repeats: int, warmup: int) -> tuple[float, float]:
    def encode() -> torch.Tensor:
        with torch.inference_mode(), autocast_context(pixels.device, precision):
            return model.encode_image(pixels)

    return median_ms(encode, repeats, warmup)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, repeats {args.repeats}, "
          f"warmup {args.warmup}; medians in ms")
    print(f"load average before: {' '.join(open('/proc/loadavg').read().split()[:3])}")
    print(f"{'stride':>6} {'tokens':>6} {'precision':>9} {'batch':>5} {'ms/batch':>9} {'ms/image':>9} "
          f"{'cpu-ms/image':>12}")
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 110, 3), dtype=np.uint8))
    for stride in (12, 16):
        config = IVTConfig(stride=stride)
        torch.manual_seed(0)
        model = IVT(config).eval()
        for precision in ("fp32", "bf16"):  # fp32 first: the bf16 adapter casts the model's weights in place
            adapter = IVTRetrievalModel(model, "bench", device, precision)
            for batch in args.batch_sizes:
                pixels = torch.randn(batch, 3, *config.image_size, device=device)
                ms, cpu_ms = encode_ms(adapter.model, pixels, precision, args.repeats, args.warmup)
                print(f"{stride:>6} {config.num_image_tokens:>6} {precision:>9} {batch:>5} {ms:>9.1f} "
                      f"{ms / batch:>9.1f} {cpu_ms / batch:>12.1f}", flush=True)
            ms, cpu_ms = median_ms(lambda adapter=adapter: adapter.encode_images([photo]), args.repeats,
                                   args.warmup)
            print(f"{stride:>6} {config.num_image_tokens:>6} {precision:>9} {'svc1':>5} {ms:>9.1f} {ms:>9.1f} "
                  f"{cpu_ms:>12.1f}", flush=True)
    print(f"load average after: {' '.join(open('/proc/loadavg').read().split()[:3])}")


if __name__ == "__main__":
    main()
