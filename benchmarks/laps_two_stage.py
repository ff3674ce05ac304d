"""LAPS two-stage text->image search vs exhaustive exact LAPS: recall of the exhaustive top-10 per candidate budget.

Usage: ``python -m benchmarks.laps_two_stage [--images 5000] [--queries 500] [--config swin|vit]
[--candidates 10 25 50 100 250 500] [--shared-direction 1.0] [--concepts N] [--threads N]``

Synthetic features, no backbone (stated): projected image tokens and caption word features at the released
sizes (default the Swin config, N=49, C=512, K=40, Nc=23; ``--config vit`` for N=196 + CLS, K=98, Nc=39), with
a concept structure so that retrieval is meaningful: ``--concepts`` random unit "concept" directions (default
images / 5, so each concept occurs in about 20 images); every image holds 4 concepts, each patch is one of them
(70 %) or background (30 %), plus noise and a shared image direction of norm ``--shared-direction`` (1.0:
same-concept word-patch cosine about 0.6; 3.0: about 0.3, a harder world); every query describes 2-3 concepts
of a target image with content words (concept + noise) among function words and [CLS]/[SEP] (shared vectors +
noise). The aggregation MLP is filled by the parity rule (crc32-normal-v1), i.e. untrained weights.

Exhaustive: the exact LAPS score of every query x image (vectorised scorer), top-10 per query.
Two-stage: FAISS exact inner-product search (IndexFlatIP) over the candidate vectors the service indexes
(``LapsSearchModel.image_vectors`` / ``caption_vectors``), the top-C candidates re-ranked by the exact score.
Reported per C: recall of the exhaustive top-10 (|two-stage top-10 & exhaustive top-10| / 10; mean, median and
minimum over queries), exact pairs scored per query (= C) and the fraction of the gallery. Two other
candidate-vector designs are shown for comparison. The re-rank reads the exhaustive matrix (the scorer is
batch-invariant); a spot check re-scores the candidates of a few queries from scratch and compares.
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from models.laps import LapsConfig, TokenAggregation
from models.laps_scoring import (
    LapsCaptionState,
    LapsImageState,
    candidate_caption_vectors,
    candidate_image_vectors,
    score_matrix,
)
from models.parity import crc32_normal_fill


def make_gallery(config: LapsConfig, num_images: int, num_queries: int, seed: int, num_concepts: int,
                 shared: float) -> tuple[LapsImageState, LapsCaptionState, np.ndarray]:
    """Synthetic image states and query caption states (see module docstring); returns also target image ids."""
    rng = np.random.default_rng(seed)
    dim, n = config.embed_size, config.num_patches
    concepts = rng.standard_normal((num_concepts, dim)).astype(np.float32)
    concepts /= np.linalg.norm(concepts, axis=1, keepdims=True)
    image_dir = rng.standard_normal(dim).astype(np.float32) / np.sqrt(dim)
    noise = 1.0 / np.sqrt(dim)
    image_concepts = np.stack([rng.choice(num_concepts, 4, replace=False) for _ in range(num_images)])
    patches = np.empty((num_images, n, dim), dtype=np.float32)
    for i in range(num_images):
        own = concepts[image_concepts[i]]
        pick = rng.integers(0, 4, n)
        content = rng.random(n) < 0.7
        patches[i] = (content[:, None] * own[pick] * rng.uniform(0.6, 1.4, (n, 1))
                      + 0.8 * noise * rng.standard_normal((n, dim)) + shared * image_dir)
    cls = None
    if config.backbone == "vit":
        cls = np.stack([concepts[image_concepts[i]].mean(0) for i in range(num_images)]) + shared * image_dir
        cls = (cls + 0.5 * noise * rng.standard_normal(cls.shape)).astype(np.float32)
    function_words = rng.standard_normal((20, dim)).astype(np.float32) / np.sqrt(dim) * 1.5
    special = rng.standard_normal((2, dim)).astype(np.float32) / np.sqrt(dim) * 1.5
    targets = rng.integers(0, num_images, num_queries)
    lengths = rng.integers(10, 19, num_queries)
    words = np.zeros((num_queries, int(lengths.max()), dim), dtype=np.float32)
    for q in range(num_queries):
        described = rng.choice(image_concepts[targets[q]], rng.integers(2, 4), replace=False)
        body = []
        for k in range(int(lengths[q]) - 2):
            if k % 2 == 0 or len(body) < len(described):
                body.append(concepts[described[len(body) % len(described)]] * rng.uniform(0.6, 1.2))
            else:
                body.append(function_words[rng.integers(0, 20)])
        rows = [special[0], *body, special[1]]
        words[q, : len(rows)] = np.stack(rows) + 0.6 * noise * rng.standard_normal((len(rows), dim))
    aggr = TokenAggregation(dim, config.num_aggregated)
    with torch.no_grad():
        for name, tensor in aggr.state_dict(keep_vars=True).items():
            tensor.data.copy_(torch.from_numpy(crc32_normal_fill(f"cross_net.aggr_net.{name}", tensor.shape)))
        patches_t = torch.from_numpy(patches)
        images = LapsImageState(patches=patches_t, cls=None if cls is None else torch.from_numpy(cls),
                                aggr_logits=aggr.logits(patches_t))
    captions = LapsCaptionState.from_embeddings(torch.from_numpy(words), torch.from_numpy(lengths))
    return images, captions, targets


def global_vectors(images: LapsImageState, captions: LapsCaptionState) -> tuple[np.ndarray, np.ndarray]:
    """Alternative design: normalised mean of the unnormalised tokens (the texts' selection query)."""
    img = F.normalize(images.patches.mean(dim=1), dim=-1).numpy()
    return img, captions.global_norm.numpy()


def patch_mean_vectors(images: LapsImageState, captions: LapsCaptionState) -> tuple[np.ndarray, np.ndarray]:
    """Alternative design: normalised mean of the normalised patches (and CLS), no LAPS token building."""
    tokens = images.patches_norm
    if images.cls_norm is not None:
        tokens = torch.cat([images.cls_norm[:, None], tokens], dim=1)
    return F.normalize(tokens.mean(dim=1), dim=-1).numpy(), candidate_caption_vectors(captions).numpy()


def recall_table(exact: np.ndarray, image_vecs: np.ndarray, query_vecs: np.ndarray,
                 budgets: list[int]) -> list[tuple[int, float, float, float]]:
    """Per budget C: (C, mean recall@10 of the exhaustive top-10, median, minimum)."""
    index = faiss.IndexFlatIP(image_vecs.shape[1])
    index.add(np.ascontiguousarray(image_vecs, dtype=np.float32))
    _, candidates = index.search(np.ascontiguousarray(query_vecs, dtype=np.float32), max(budgets))
    truth = np.argsort(-exact, axis=1, kind="stable")[:, :10]
    rows = []
    for budget in budgets:
        recalls = []
        for q in range(exact.shape[0]):
            cand = candidates[q, :budget]
            top = cand[np.argsort(-exact[q, cand], kind="stable")[:10]]
            recalls.append(len(set(top.tolist()) & set(truth[q].tolist())) / 10.0)
        recalls = np.asarray(recalls)
        rows.append((budget, float(recalls.mean()), float(np.median(recalls)), float(recalls.min())))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--config", default="swin", choices=["swin", "vit"])
    parser.add_argument("--candidates", type=int, nargs="+", default=[10, 25, 50, 100, 250, 500])
    parser.add_argument("--shared-direction", type=float, default=1.0)
    parser.add_argument("--concepts", type=int, default=0, help="default: images / 5")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = LapsConfig.released(args.config)
    num_concepts = args.concepts or max(8, args.images // 5)
    images, queries, targets = make_gallery(config, args.images, args.queries, args.seed, num_concepts,
                                            args.shared_direction)
    print(f"LAPS two-stage benchmark: {args.images} images, {args.queries} text queries, {args.config} sizes "
          f"(N={config.num_patches}, C={config.embed_size}, K={config.keep_k}, Nc={config.num_aggregated}), "
          f"synthetic features ({num_concepts} concepts, shared direction {args.shared_direction}), untrained "
          f"(parity-filled) aggregation weights")
    start = time.perf_counter()
    exact = score_matrix(images, queries, config.keep_k).numpy().T  # [queries, images]
    exhaustive_s = time.perf_counter() - start
    print(f"exhaustive exact scores: {exact.size:,} pairs in {exhaustive_s:.0f} s "
          f"({exact.size / exhaustive_s:,.0f} pairs/s); target image ranked first for "
          f"{np.mean(exact.argmax(1) == targets) * 100:.1f} % of queries")
    default = "LAPS text-free tokens, mean of normalised (service default)"
    with torch.no_grad():
        designs = {
            default: (candidate_image_vectors(images, config.keep_k).numpy(),
                      candidate_caption_vectors(queries).numpy()),
            "mean of normalised patches": patch_mean_vectors(images, queries),
            "normalised mean of raw tokens": global_vectors(images, queries),
        }
    for name, (img_vecs, txt_vecs) in designs.items():
        print(f"\ncandidate vectors: {name}")
        print("C (pairs scored per query) | % of gallery | recall of exhaustive top-10: mean | median | min")
        for budget, mean, median, low in recall_table(exact, img_vecs, txt_vecs, args.candidates):
            print(f"{budget} | {100.0 * budget / args.images:.1f} % | {mean:.4f} | {median:.2f} | {low:.2f}")
    # spot check: re-scoring the candidates from scratch gives the same numbers as the exhaustive matrix
    index = faiss.IndexFlatIP(config.embed_size)
    index.add(designs[default][0])
    _, cand = index.search(designs[default][1][:5], 250)
    worst = 0.0
    for q in range(5):
        rescored = score_matrix(images.select(cand[q].tolist()), queries.select([q]), config.keep_k)[:, 0]
        worst = max(worst, float(np.abs(rescored.numpy() - exact[q, cand[q]]).max()))
    print(f"\nspot check (5 queries x 250 candidates re-scored from scratch): max |diff| {worst:.2e}")


if __name__ == "__main__":
    main()
