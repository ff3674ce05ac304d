"""LAPS training losses and retrieval metrics, as the official code computes them.

- :func:`contrastive_loss`: ``lib/loss.py: ContrastiveLoss`` (VSE++ hinge, margin 0.2, every same-image pair
  masked, sum reduction; sum over all negatives or only the hardest one).
- :func:`ratio_loss`: the ratio term of ``lib/vse.py: VSEModel.forward``, ``(mean(keep) - rho)^2``. With the
  released hard top-K it is a gradient-free constant; with ``selection="paper"`` (Gumbel-softmax decisions)
  it is the paper's ratio constraint and does train the selection.
- :func:`i2t_recall`, :func:`t2i_recall`, :func:`evaluate_sims`: ``lib/evaluation.py`` ``i2t`` / ``t2i``
  (coco mode: caption j belongs to image j // 5) and ``evalrank``'s rsum, plus the COCO 5-fold average.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor


def contrastive_loss(scores: Tensor, img_ids: Tensor, margin: float = 0.2, max_violation: bool = False) -> Tensor:
    """VSE++ hinge on a square similarity matrix (rows = images, columns = captions, diagonal = positives).

    ``cost_s[i, j] = [margin + S[i, j] - S[i, i]]_+`` (image i against every caption) and
    ``cost_im[i, j] = [margin + S[i, j] - S[j, j]]_+`` (caption j against every image), both zeroed wherever
    ``img_ids[i] == img_ids[j]``; summed, or (``max_violation``) the hardest negative per query summed.
    """
    positives = scores.diag().view(-1, 1)
    cost_s = (margin + scores - positives.expand_as(scores)).clamp(min=0)
    cost_im = (margin + scores - positives.t().expand_as(scores)).clamp(min=0)
    same_image = img_ids.view(-1, 1) == img_ids.view(1, -1)
    cost_s = cost_s.masked_fill(same_image, 0)
    cost_im = cost_im.masked_fill(same_image, 0)
    if max_violation:
        return cost_s.max(dim=1).values.sum() + cost_im.max(dim=0).values.sum()
    return cost_s.sum() + cost_im.sum()


def ratio_loss(keep: Tensor, sparse_ratio: float) -> Tensor:
    """``(mean(keep) - rho)^2`` over every pair and patch (weighted by ``ratio_weight`` = 2 in training)."""
    return (keep.float().mean() - sparse_ratio) ** 2


def laps_training_loss(scores: Tensor, keep: Tensor, img_ids: Tensor, sparse_ratio: float, margin: float = 0.2,
                       max_violation: bool = True, ratio_weight: float = 2.0,
                       warmup_alpha: float = 1.0) -> tuple[Tensor, dict[str, float]]:
    """Total official objective: ``warmup_alpha * contrastive + ratio_weight * ratio`` (``train.py``)."""
    align = contrastive_loss(scores, img_ids, margin, max_violation)
    ratio = ratio_loss(keep, sparse_ratio)
    total = warmup_alpha * align + ratio_weight * ratio
    return total, {"contrastive": float(align.detach()), "ratio": float(ratio.detach()), "total": float(total.detach())}


def _summary(ranks: np.ndarray) -> tuple[float, float, float, float, float]:
    """R@1/5/10 (percent), medr = floor(median) + 1, meanr = mean + 1, from 0-based ranks."""
    n = len(ranks)
    r1 = 100.0 * float(np.sum(ranks < 1)) / n
    r5 = 100.0 * float(np.sum(ranks < 5)) / n
    r10 = 100.0 * float(np.sum(ranks < 10)) / n
    return r1, r5, r10, float(np.floor(np.median(ranks)) + 1), float(ranks.mean() + 1)


def i2t_recall(sims: np.ndarray, npts: int | None = None,
               captions_per_image: int = 5) -> tuple[tuple[float, ...], np.ndarray]:
    """Image -> text: rank of the best of image i's captions ``5i..5i+4`` in ``argsort(sims[i])[::-1]``."""
    sims = np.asarray(sims)
    npts = sims.shape[0] if npts is None else npts
    ranks = np.zeros(npts, dtype=np.int64)
    for i in range(npts):
        order = np.argsort(sims[i])[::-1]
        position = np.empty_like(order)
        position[order] = np.arange(len(order))
        ranks[i] = position[captions_per_image * i: captions_per_image * (i + 1)].min()
    return _summary(ranks), ranks


def t2i_recall(sims: np.ndarray, npts: int | None = None,
               captions_per_image: int = 5) -> tuple[tuple[float, ...], np.ndarray]:
    """Text -> image: rank of image ``j // 5`` in ``argsort(sims[:, j])[::-1]`` for every caption j."""
    sims = np.asarray(sims)
    npts = sims.shape[0] if npts is None else npts
    ranks = np.zeros(captions_per_image * npts, dtype=np.int64)
    columns = sims.T
    for j in range(captions_per_image * npts):
        order = np.argsort(columns[j])[::-1]
        ranks[j] = int(np.where(order == j // captions_per_image)[0][0])
    return _summary(ranks), ranks


def evaluate_sims(sims: np.ndarray, captions_per_image: int = 5) -> dict[str, Any]:
    """All ``evalrank`` numbers of one similarity matrix [images, captions]."""
    (r1, r5, r10, medr, meanr), _ = i2t_recall(sims, sims.shape[0], captions_per_image)
    (ri1, ri5, ri10, medri, meanri), _ = t2i_recall(sims, sims.shape[0], captions_per_image)
    return {
        "i2t_r1": r1, "i2t_r5": r5, "i2t_r10": r10, "i2t_medr": medr, "i2t_meanr": meanr,
        "t2i_r1": ri1, "t2i_r5": ri5, "t2i_r10": ri10, "t2i_medr": medri, "t2i_meanr": meanri,
        "rsum": r1 + r5 + r10 + ri1 + ri5 + ri10,
    }


def average_folds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """COCO 1K: the mean of every metric over the 5 folds (``evalrank(fold5=True)``)."""
    return {key: float(np.mean([r[key] for r in results])) for key in results[0]}
