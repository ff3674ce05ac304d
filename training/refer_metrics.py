"""Referring-segmentation metrics exactly as the official MagNet / LAVT ``test.py: evaluate`` computes them.

Per sentence (every expression of a referred object is one entry), at the network resolution S x S:
``I = sum(pred AND gt)``, ``U = sum(pred OR gt)``, ``IoU = I / U`` (0.0 when ``U == 0``; such a pair still
counts in the mIoU and precision denominators). Then

- mIoU = mean of the per-sentence IoUs,
- oIoU ("overall IoU") = cumulative I / cumulative U over the split,
- prec@X = fraction of sentences with IoU >= X (greater OR equal), X in 0.5, 0.6, 0.7, 0.8, 0.9.

The prediction is ``sigmoid(bilinear_align_corners_true(pred_masks, S x S)) > 0.5`` and the ground truth the
NEAREST-resized target (``models.magnet.reference_target``), so the numbers are *not* at the original image size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

IOU_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)


def intersection_union(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """Official ``computeIoU``: pixel counts of pred AND gt and of pred OR gt (inputs are truthy masks)."""
    inter = int(np.sum(np.logical_and(pred, gt)))
    union = int(np.sum(np.logical_or(pred, gt)))
    return inter, union


@dataclass
class ReferSegmentationMetrics:
    """Accumulates sentences one at a time, as the official loop does."""

    thresholds: Sequence[float] = IOU_THRESHOLDS
    ious: list[float] = field(default_factory=list)
    cum_intersection: int = 0
    cum_union: int = 0

    def update(self, pred: np.ndarray, gt: np.ndarray) -> float:
        """Add one sentence; returns its IoU."""
        inter, union = intersection_union(pred, gt)
        iou = 0.0 if union == 0 else inter * 1.0 / union
        self.ious.append(iou)
        self.cum_intersection += inter
        self.cum_union += union
        return iou

    @property
    def num_sentences(self) -> int:
        return len(self.ious)

    @property
    def mean_iou(self) -> float:
        return float(np.mean(np.asarray(self.ious))) if self.ious else 0.0

    @property
    def overall_iou(self) -> float:
        return self.cum_intersection / self.cum_union if self.cum_union else 0.0

    @property
    def precision(self) -> list[float]:
        """prec@X for each threshold, as fractions (IoU >= X counts)."""
        if not self.ious:
            return [0.0 for _ in self.thresholds]
        correct = [sum(iou >= t for iou in self.ious) for t in self.thresholds]
        return [c / len(self.ious) for c in correct]

    def summary(self) -> dict[str, float]:
        out = {"mIoU": self.mean_iou, "oIoU": self.overall_iou}
        out.update({f"prec@{t}": p for t, p in zip(self.thresholds, self.precision, strict=True)})
        return out

    def report_lines(self) -> list[str]:
        """The lines the official script prints (values x100, 2 decimals)."""
        correct = [sum(iou >= t for iou in self.ious) for t in self.thresholds]
        total = max(len(self.ious), 1)
        lines = [f"Mean IoU is {self.mean_iou * 100.0:.2f}"]
        lines += [f"precision@{t!s} = {c * 100.0 / total:.2f}"
                  for t, c in zip(self.thresholds, correct, strict=True)]
        lines.append(f"overall IoU = {self.overall_iou * 100.0:.2f}")
        return lines
