"""ScanFormer scan vs a dense single pass at the finest scale: median latency and FLOPs (full ViLT-B/32 size).

Usage: ``python -m benchmarks.scanformer_scan [--runs 15] [--warmup 3] [--batch 1] [--threads N] [--bf16]``

The scan runs in inference mode with constant tokens merged; its selection is forced to keep a fraction
0.25 / 0.5 / 1.0 of every scale's grid after the first (``keep_fractions``), so the cost does not depend on
the (random) weights. The dense baseline is what ViLT itself does on the finest image: [text | REG | every
finest patch] through all layers once, full attention. Attention FLOPs count q k^T and attn v
(4 * queries * keys * D per layer, one multiply-add = 2 FLOPs); "total" adds the qkv / proj / MLP matmuls
(24 * tokens * D^2 per layer) and the patch embedding. The scan's counts come from the token counts it
actually ran (``ScanOutput.steps``, merged constant and padding slots included).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from models.scanformer import ScanFormer, ScanFormerConfig, ScanOutput


def layer_flops(queries: int, keys: int, dim: int) -> tuple[int, int]:
    """(attention, linear) FLOPs of one pre-norm block for ``queries`` new tokens over ``keys`` keys."""
    attention = 4 * queries * keys * dim
    linear = 2 * queries * (3 * dim * dim + dim * dim + 2 * 4 * dim * dim)
    return attention, linear


def scan_flops(out: ScanOutput, cfg: ScanFormerConfig) -> tuple[int, int]:
    dim, layers, batch = cfg.vilt.hidden_size, cfg.vilt.num_layers, out.boxes.shape[0]
    attention = linear = 0
    for step in out.steps:  # token counts per sample (padded slots included)
        a, lin = layer_flops(step.queries, step.keys, dim)
        attention += batch * layers * a
        linear += batch * layers * lin
    patch_dim = 3 * cfg.vilt.patch_size**2
    linear += int(out.kept_counts.sum()) * 2 * patch_dim * dim
    return attention, attention + linear


def dense_flops(cfg: ScanFormerConfig, text_len: int) -> tuple[int, int]:
    dim, layers = cfg.vilt.hidden_size, cfg.vilt.num_layers
    patches = cfg.grid_sizes[-1] ** 2
    tokens = text_len + 1 + patches
    a, lin = layer_flops(tokens, tokens, dim)
    patch_embed = patches * 2 * 3 * cfg.vilt.patch_size**2 * dim
    return layers * a, layers * (a + lin) + patch_embed


def dense_finest_pass(model: ScanFormer, text_ids: torch.Tensor, text_mask: torch.Tensor,
                      pixels: torch.Tensor) -> torch.Tensor:
    """[text | REG | all finest patches] in one forward with full attention (ViLT's dense way) -> box.

    Text padding is trimmed as in the scan (exact: padded keys are masked), so both get the same text.
    """
    cfg = model.cfg
    text_ids, text_mask = model.trim_text_padding(text_ids, text_mask)
    batch, scale = text_ids.shape[0], cfg.num_scales - 1
    grid = cfg.grid_sizes[scale]
    patches = pixels.reshape(batch, 3, grid, cfg.vilt.patch_size, grid, cfg.vilt.patch_size)
    patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, grid * grid, -1)
    positions = torch.arange(grid * grid).expand(batch, -1)
    image = model.patch_embeddings(patches, positions, scale) + model.token_type_embeddings.weight[1]
    x = torch.cat([model.embed_text(text_ids), model.reg_token(scale, batch), image], dim=1)
    key_bias = torch.zeros(batch, x.shape[1])
    key_bias[:, : text_ids.shape[1]] = key_bias[:, : text_ids.shape[1]].masked_fill(text_mask == 0, -torch.inf)
    bias = key_bias[:, None, None, :]
    for block in model.transformer.blocks:
        x, _ = block(x, bias)
    return model.box_head(model.transformer.norm(x[:, text_ids.shape[1]]))


def median_ms(fn, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--bf16", action="store_true", help="CPU bf16 autocast")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ScanFormerConfig()
    model = ScanFormer(cfg).eval()
    batch, text_len = args.batch, 12  # a typical RefCOCO expression: [CLS] + 10 words + [SEP]
    text_ids = torch.randint(1000, 20000, (batch, cfg.vilt.max_text_len))
    text_mask = torch.zeros(batch, cfg.vilt.max_text_len, dtype=torch.long)
    text_mask[:, :text_len] = 1
    pixels = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)

    print(f"ScanFormer scan vs dense, ViLT-B/32 ({cfg.vilt.num_layers} layers, D={cfg.vilt.hidden_size}), "
          f"canvas {cfg.image_size}, scales {cfg.scale_sizes} -> grids {cfg.grid_sizes}, text {text_len} tokens "
          f"(padding to {cfg.vilt.max_text_len} trimmed in both), "
          f"batch {batch}, threads {torch.get_num_threads()}, {'bf16' if args.bf16 else 'fp32'}, "
          f"median of {args.runs} runs")
    with torch.inference_mode(), autocast:
        dense_ms = median_ms(lambda: dense_finest_pass(model, text_ids, text_mask, pixels), args.runs, args.warmup)
    dense_attn, dense_total = dense_flops(cfg, text_len)
    header = f"{'run':<22}{'kept per scale':<20}{'ms':>9}{'x dense':>9}{'attn GFLOP':>12}{'x dense':>9}" \
             f"{'total GFLOP':>13}{'x dense':>9}"
    print(header)
    print(f"{'dense finest':<22}{str([cfg.grid_sizes[-1] ** 2]):<20}{dense_ms:>9.1f}{1.0:>9.2f}"
          f"{batch * dense_attn / 1e9:>12.3f}{1.0:>9.2f}{batch * dense_total / 1e9:>13.2f}{1.0:>9.2f}")
    for ratio in (0.25, 0.5, 1.0):
        fractions = [ratio] * (cfg.num_scales - 1)
        with torch.inference_mode(), autocast:
            out = model(text_ids, text_mask, pixels, keep_fractions=fractions)
            scan_ms = median_ms(lambda f=fractions: model(text_ids, text_mask, pixels, keep_fractions=f),
                                args.runs, args.warmup)
        attn, total = scan_flops(out, cfg)
        kept = out.kept_counts[0].tolist()
        print(f"{f'scan keep {ratio:g}':<22}{str(kept):<20}{scan_ms:>9.1f}{scan_ms / dense_ms:>9.2f}"
              f"{attn / 1e9:>12.3f}{attn / (batch * dense_attn):>9.2f}{total / 1e9:>13.2f}"
              f"{total / (batch * dense_total):>9.2f}")


if __name__ == "__main__":
    main()
