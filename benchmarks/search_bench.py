"""Person-search benchmark: IRRA text encoding fp32 vs bf16, per-image encoding of IRRA and IVT (stride 12
and 16), FAISS index kinds against exact search at 100k and 1M vectors, and end-to-end ``/search`` latency
over HTTP on a 100k gallery.

    python -m benchmarks.search_bench            # everything (about 10 minutes on 2 cores)
    python -m benchmarks.search_bench --quick    # 20k/100k vectors, fewer repeats

All timings are medians of repeated runs, measured side by side in one process. Gallery vectors are
synthetic but structured (clusters on a low-dimensional manifold plus noise), because recall on isotropic
random vectors says nothing (research/environment.md section 5).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from service.index import VectorIndex
from service.store import CollectionStore, NewItem


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def structured_vectors(n: int, dim: int = 512, seed: int = 0, intrinsic: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, intrinsic)))[0].T.astype(np.float32)
    centres = rng.standard_normal((max(n // 50, 1), intrinsic)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        stop = min(start + 100_000, n)
        latent = centres[rng.integers(0, len(centres), stop - start)]
        latent += 0.35 * rng.standard_normal(latent.shape).astype(np.float32)
        block = latent @ basis + 0.05 * rng.standard_normal((stop - start, dim)).astype(np.float32)
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def bench_text_encoding(repeats: int) -> None:
    from models.irra import IRRARetrievalModel

    print("\n== IRRA text encoding (full CLIP text tower, random init), fp32 vs bf16 autocast")
    captions = ["A woman with long black hair wears a white T-shirt, blue jeans and red sneakers.",
                "a man in a grey hoodie carrying a black backpack"] * 16
    models = {p: IRRARetrievalModel.from_config(None, precision=p, seed=0) for p in ("fp32", "bf16")}
    feats = {p: m.encode_texts(captions) for p, m in models.items()}
    cosine = float(np.min(np.sum(feats["fp32"] * feats["bf16"], axis=1)))
    for batch in (1, 32):
        row = {p: median_ms(lambda m=m, b=batch: m.encode_texts(captions[:b]), repeats) for p, m in models.items()}
        print(f"batch {batch:3d}: fp32 {row['fp32']:8.1f} ms   bf16 {row['bf16']:8.1f} ms   "
              f"speed-up x{row['fp32'] / row['bf16']:.2f}")
    print(f"min cosine(fp32, bf16) over {len(captions)} captions: {cosine:.6f}")


def bench_image_encoding(repeats: int, batch: int = 8) -> None:
    """Per-image encode latency of the person-search towers, side by side (random init, full size)."""
    from PIL import Image

    from models.irra import IRRARetrievalModel
    from models.ivt import IVTConfig, IVTRetrievalModel

    print(f"\n== person image encoding, ms per image at batch {batch} (PIL preprocessing included), median")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (256, 100, 3), dtype=np.uint8)) for _ in range(batch)]
    builders = {
        "IRRA (ViT-B/16, 193 tokens)": lambda p: IRRARetrievalModel.from_config(None, precision=p, seed=0),
        "IVT stride 16 (193 tokens)": lambda p: IVTRetrievalModel.from_config(IVTConfig(stride=16), precision=p),
        "IVT stride 12 (311 tokens)": lambda p: IVTRetrievalModel.from_config(IVTConfig(stride=12), precision=p),
    }
    for name, build in builders.items():
        row = {}
        for precision in ("fp32", "bf16"):
            model = build(precision)
            model.encode_images(images[:1])
            row[precision] = median_ms(lambda m=model: m.encode_images(images), repeats) / batch
            del model
        print(f"{name:<28} fp32 {row['fp32']:7.1f}   bf16 {row['bf16']:7.1f}   x{row['fp32'] / row['bf16']:.2f}")


def recall_at_10(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)]))


def bench_faiss(sizes: list[int], queries_n: int, repeats: int, hnsw_max: int) -> None:
    print("\n== FAISS: latency (median ms) and recall@10 against exact flat search, 512-d")
    print(f"{'n':>9} {'index':<16} {'build s':>8} {'1 query':>9} {'64 queries':>11} {'recall@10':>10}")
    for n in sizes:
        data = structured_vectors(n + queries_n, seed=n)
        gallery, queries = data[:n], data[n:]
        ids = np.arange(n, dtype=np.int64)
        flat = VectorIndex(512, "flat")
        start = time.perf_counter()
        flat.add(ids, gallery)
        flat_build = time.perf_counter() - start
        _, exact = flat.search(queries, 10)
        configs: list[tuple[str, VectorIndex, float]] = [("flat (exact)", flat, flat_build)]
        for nprobe in (16, 64):
            start = time.perf_counter()
            ivf = VectorIndex(512, "ivf", nprobe=nprobe)
            ivf.add(ids, gallery)
            configs.append((f"ivf nprobe={nprobe}", ivf, time.perf_counter() - start))
        if n <= hnsw_max:
            start = time.perf_counter()
            hnsw = VectorIndex(512, "hnsw", ef_search=128)
            hnsw.add(ids, gallery)
            configs.append(("hnsw ef=128", hnsw, time.perf_counter() - start))
        for name, index, build in configs:
            one = median_ms(lambda index=index, q=queries[:1]: index.search(q, 10), repeats * 3)
            batch = median_ms(lambda index=index, q=queries[:64]: index.search(q, 10), repeats)
            _, found = index.search(queries, 10)
            print(f"{n:>9} {name:<16} {build:8.1f} {one:9.2f} {batch:11.1f} {recall_at_10(found, exact):10.3f}")
        del configs, flat, data


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_http(n: int, repeats: int) -> None:
    import httpx

    print(f"\n== end-to-end POST /search over HTTP, IRRA (full size, random init, fp32 and bf16), {n} gallery items")
    workdir = Path(tempfile.mkdtemp(prefix="vls-bench-"))
    try:
        store = CollectionStore(workdir / "data", snapshot_every=10**9)
        store.create("bench", ["irra"])
        vectors = structured_vectors(n, seed=7)
        for start in range(0, n, 5000):
            chunk = [NewItem(None, "", 0, 0, {"person_id": int(i // 4)}, f"item{i}", vectors={"irra": vectors[i]})
                     for i in range(start, min(start + 5000, n))]
            store.add_items("bench", chunk, {"irra": "random-init"})
        store.search("bench", "irra", vectors[:1], 1)
        store.close()
        for precision in ("fp32", "bf16"):
            port = free_port()
            env = {**os.environ, "VLS_DATA_DIR": str(workdir / "data"), "VLS_WEIGHTS_DIR": str(workdir / "none"),
                   "VLS_METHODS": "irra", "VLS_PRECISION": precision}
            server = subprocess.Popen([sys.executable, "-m", "uvicorn", "service.app:app", "--port", str(port),
                                       "--log-level", "warning"], env=env)
            try:
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
                    deadline = time.time() + 300
                    while time.time() < deadline:
                        try:
                            if client.get("/readyz").status_code == 200:
                                break
                        except httpx.TransportError:
                            pass
                        time.sleep(0.5)
                    counter = iter(range(10**6))

                    def query(cached: bool, counter=counter) -> None:  # noqa: ANN001
                        text = "a man in a red jacket" if cached else f"a person with a bag number {next(counter)}"
                        response = client.post("/search", json={"collection": "bench", "method": "irra",
                                                                 "query": text, "top_k": 10})
                        assert response.status_code == 200, response.text

                    query(True)
                    cold = median_ms(lambda: query(False), repeats)
                    warm = median_ms(lambda: query(True), repeats)
                    print(f"{precision}: new query text {cold:7.1f} ms   repeated (cached embedding) {warm:7.1f} ms")
            finally:
                server.terminate()
                server.wait(30)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip", nargs="*", default=[], choices=["text", "image", "faiss", "http"])
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    repeats = 5 if args.quick else 15
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu")
    if "text" not in args.skip:
        bench_text_encoding(repeats)
    if "image" not in args.skip:
        bench_image_encoding(max(3, repeats // 3))
    if "faiss" not in args.skip:
        bench_faiss([20_000, 100_000] if args.quick else [100_000, 1_000_000], 200, repeats,
                    hnsw_max=100_000)
    if "http" not in args.skip:
        bench_http(20_000 if args.quick else 100_000, repeats)


if __name__ == "__main__":
    main()
