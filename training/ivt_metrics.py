"""Text-to-image person retrieval metrics for IVT.

Two protocols, both text -> image, cosine similarity of L2-normalised features:

- ``official_ivt_metrics`` reproduces the official evaluators of PersonRetrieval-IVT (``utils/metrics.py``):
  ``R1_mAP_CUHK`` (CUHK-PEDES and RSTPReid, ``paired_gallery=True``) and ``R1_mAP_ICFG`` (ICFG-PEDES,
  ``paired_gallery=False``). Inputs are caption-level rows (one image feature, one caption feature and one
  pid per test item). With ``paired_gallery`` the gallery is ``image_feats[::2]`` / ``pids[::2]``: the
  official code assumes every image appears exactly twice, consecutively, in the caption list. A query
  whose pid has no gallery row is skipped but still counts in the denominator. AP is the trapezoidal
  "old Market-1501" AP: for the i-th relevant gallery row (0-based) at rank r_i,
  ``AP += (1/ngood) * (old_precision + precision) / 2`` with ``precision = (i+1)/(r_i+1)`` and
  ``old_precision = i/r_i`` (1.0 when r_i = 0). Use it to compare with numbers in IVT's logs and paper.
- ``standard_metrics`` is the protocol used across text-based person retrieval (IRRA and later): queries are
  all captions, the gallery holds every test image exactly once (rows deduplicated by image id, whatever
  their order), ranking and non-interpolated AP / mINP come from ``training.person_metrics.rank`` (IRRA's
  official ``rank``). It does not depend on the caption list's order or on two captions per image.
- ``evaluate_ivt`` uses the standard protocol by default and the official one with ``official=True``.
All values are fractions (IVT's logs print fractions; IRRA's ``rank`` works in percent and is converted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from training.person_metrics import rank


@dataclass
class RetrievalMetrics:
    """R@k as fractions (R@k = cmc[k-1]), mAP, and the whole CMC curve over the gallery."""

    r1: float
    r5: float
    r10: float
    r20: float
    mAP: float
    cmc: np.ndarray
    num_queries: int
    num_gallery: int
    protocol: str
    mINP: float | None = None  # standard protocol only

    def as_dict(self) -> dict[str, float]:
        out = {"R1": self.r1, "R5": self.r5, "R10": self.r10, "R20": self.r20, "mAP": self.mAP}
        if self.mINP is not None:
            out["mINP"] = self.mINP
        return out


def _as_tensor(features: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features).float()


def _rank_at(cmc: np.ndarray, k: int) -> float:
    return float(cmc[min(k, len(cmc)) - 1]) if len(cmc) else 0.0


def official_ivt_rank(
    query_feats: torch.Tensor,
    query_pids: np.ndarray,
    gallery_feats: torch.Tensor,
    gallery_pids: np.ndarray,
    chunk_size: int = 256,
) -> tuple[np.ndarray, float]:
    """Official ``compute_metric_sim``, vectorised: (CMC float32 [G], trapezoidal mAP).

    Features must already be L2-normalised. Scores are ``gallery @ query`` in float32 and each query ranks
    the gallery with ``np.argsort(score)[::-1]`` as officially (ties resolved the same way).
    """
    num_queries, num_gallery = len(query_pids), len(gallery_pids)
    first_hit_counts = np.zeros(num_gallery, dtype=np.int64)
    ap_sum = 0.0
    for start in range(0, num_queries, chunk_size):
        stop = min(start + chunk_size, num_queries)
        scores = torch.mm(gallery_feats, query_feats[start:stop].t()).t().cpu().numpy()  # [q, G]
        order = np.argsort(scores, axis=1)[:, ::-1]
        matches = gallery_pids[order] == query_pids[start:stop, None]  # relevance in rank order
        ngood = matches.sum(axis=1)
        has_match = ngood > 0
        first_hit_counts += np.bincount(matches.argmax(axis=1)[has_match], minlength=num_gallery)
        rows, ranks = np.nonzero(matches)  # sorted by query, then by rank
        row_start = np.concatenate([[0], np.cumsum(ngood)[:-1]])
        i = np.arange(len(rows)) - row_start[rows]  # 0-based index of the hit among the query's hits
        precision = (i + 1) / (ranks + 1)
        old_precision = np.where(ranks == 0, 1.0, i / np.maximum(ranks, 1))
        terms = (1.0 / ngood[rows]) * (old_precision + precision) / 2
        ap_sum += math.fsum(np.bincount(rows, weights=terms, minlength=stop - start).tolist())
    cmc = np.cumsum(first_hit_counts).astype(np.float32) / num_queries
    return cmc, ap_sum / num_queries


def official_ivt_metrics(
    image_feats: np.ndarray | torch.Tensor,
    text_feats: np.ndarray | torch.Tensor,
    pids: np.ndarray | list[int],
    paired_gallery: bool = True,
) -> RetrievalMetrics:
    """Official ``R1_mAP_CUHK`` (``paired_gallery=True``: CUHK-PEDES, RSTPReid) or ``R1_mAP_ICFG`` (False).

    ``image_feats``, ``text_feats`` and ``pids`` are caption-level rows in the official test-list order.
    Queries are all captions; the gallery is every other image row (``[::2]``) or all image rows.
    """
    pids = np.asarray(pids)
    images = F.normalize(_as_tensor(image_feats), dim=1, p=2)
    texts = F.normalize(_as_tensor(text_feats), dim=1, p=2)
    gallery, gallery_pids = (images[::2], pids[::2]) if paired_gallery else (images, pids)
    cmc, mean_ap = official_ivt_rank(texts, pids, gallery, gallery_pids)
    return RetrievalMetrics(
        r1=_rank_at(cmc, 1), r5=_rank_at(cmc, 5), r10=_rank_at(cmc, 10), r20=_rank_at(cmc, 20),
        mAP=mean_ap, cmc=cmc, num_queries=len(pids), num_gallery=len(gallery_pids),
        protocol="ivt-official-cuhk" if paired_gallery else "ivt-official-icfg",
    )


def unique_gallery_rows(image_ids: np.ndarray | list) -> np.ndarray:
    """Row index of the first occurrence of every distinct image id, in list order."""
    _, first = np.unique(np.asarray(image_ids), return_index=True)
    return np.sort(first)


def standard_metrics(
    image_feats: np.ndarray | torch.Tensor,
    text_feats: np.ndarray | torch.Tensor,
    pids: np.ndarray | list[int],
    image_ids: np.ndarray | list,
    max_rank: int = 20,
) -> RetrievalMetrics:
    """Standard unique-gallery protocol from caption-level rows (``image_ids[i]`` names row i's image).

    Queries: every caption; gallery: each distinct image once; cosine similarity; R@k from the CMC,
    non-interpolated AP (mean of precision at every correct rank) and mINP, via IRRA's official ``rank``.
    """
    pids = np.asarray(pids)
    if len(image_ids) != len(pids):
        raise ValueError(f"{len(image_ids)} image ids for {len(pids)} caption rows")
    rows = unique_gallery_rows(image_ids)
    images = F.normalize(_as_tensor(image_feats)[torch.from_numpy(rows)], dim=1, p=2)
    texts = F.normalize(_as_tensor(text_feats), dim=1, p=2)
    result = rank(texts @ images.t(), torch.from_numpy(pids), torch.from_numpy(pids[rows]), max_rank=max_rank)
    cmc = result.cmc / np.float32(100.0)
    return RetrievalMetrics(
        r1=_rank_at(cmc, 1), r5=_rank_at(cmc, 5), r10=_rank_at(cmc, 10), r20=_rank_at(cmc, 20),
        mAP=float(result.mAP) / 100.0, cmc=cmc, num_queries=len(pids), num_gallery=len(rows),
        protocol="standard-unique-gallery", mINP=float(result.mINP) / 100.0,
    )


def evaluate_ivt(
    image_feats: np.ndarray | torch.Tensor,
    text_feats: np.ndarray | torch.Tensor,
    pids: np.ndarray | list[int],
    image_ids: np.ndarray | list | None = None,
    official: bool = False,
    paired_gallery: bool = True,
) -> RetrievalMetrics:
    """Text-to-image metrics from caption-level rows.

    Default: ``standard_metrics`` (needs ``image_ids``). ``official=True``: the official IVT evaluator,
    ``paired_gallery=True`` for CUHK-PEDES / RSTPReid (``[::2]`` gallery), ``False`` for ICFG-PEDES.
    """
    if official:
        return official_ivt_metrics(image_feats, text_feats, pids, paired_gallery=paired_gallery)
    if image_ids is None:
        raise ValueError("the standard protocol needs image_ids to build a gallery of unique images "
                         "(or pass official=True for the official IVT evaluator)")
    return standard_metrics(image_feats, text_feats, pids, image_ids)
