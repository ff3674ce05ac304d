"""Text-to-person retrieval metrics exactly as the official IRRA ``utils/metrics.py`` computes them.

For every text query the whole gallery is sorted by descending cosine similarity; a gallery image is a correct
match when its person id equals the query's (camera and image ids are ignored).

- CMC / R@K: ``clip(cumsum(matches[:, :max_rank]), max=1)`` averaged over queries, x100; only
  ``min(max_rank, G)`` values exist, so with fewer than 10 gallery images R10 is undefined (the official
  ``Evaluator`` then fails with an IndexError; ``RankResult.recall_at`` leaves it out).
- mAP: non-interpolated AP over the full ranking, ``sum_k precision@k * match_k / num_rel``, x100.
- mINP: ``num_rel / rank of the last correct match`` (1-based), averaged, x100.

Vectorised and processed in chunks of queries, so a 20k x 20k evaluation never holds the full int64 ranking
(the official code does). The float32 arithmetic is the official one, so the numbers agree with it.
``torch.argsort`` is not stable: tied similarities may be ordered differently, as in the official code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class RankResult:
    cmc: np.ndarray  # float32 [min(max_rank, G)], percentages
    mAP: float | None
    mINP: float | None
    indices: np.ndarray | None = None  # int64 [Q, G] descending ranking (or [Q, k] without mAP)

    def recall_at(self, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
        """``{'R1': ..., 'R5': ..., 'R10': ...}`` for the ks the CMC covers."""
        return {f"R{k}": float(self.cmc[k - 1]) for k in ks if k <= len(self.cmc)}

    def as_dict(self) -> dict[str, float]:
        out = self.recall_at()
        if self.mAP is not None:
            out.update(mAP=self.mAP, mINP=self.mINP)
        return out


def _as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


ArrayLike = torch.Tensor | np.ndarray


def rank(similarity: ArrayLike, q_pids: ArrayLike, g_pids: ArrayLike, max_rank: int = 10,
         get_mAP: bool = True, return_indices: bool = False, chunk_size: int = 1024) -> RankResult:
    """The official ``rank(similarity, q_pids, g_pids, max_rank, get_mAP)`` on a [Q, G] similarity matrix.

    With ``get_mAP=False`` only the CMC is computed, from a ``topk`` instead of a full sort."""
    similarity = _as_tensor(similarity)
    q_pids = _as_tensor(q_pids).to(similarity.device).reshape(-1)
    g_pids = _as_tensor(g_pids).to(similarity.device).reshape(-1)
    num_q, num_g = similarity.shape
    if q_pids.numel() != num_q or g_pids.numel() != num_g:
        raise ValueError(f"similarity is {num_q}x{num_g} but there are {q_pids.numel()} query and "
                         f"{g_pids.numel()} gallery ids")
    width = min(max_rank, num_g)
    positions = torch.arange(1, num_g + 1, dtype=torch.float32, device=similarity.device)
    cmc_hits = torch.zeros(width, dtype=torch.int64, device=similarity.device)
    ap_parts, inp_parts, index_parts = [], [], []
    for start in range(0, num_q, chunk_size):
        sim = similarity[start : start + chunk_size]
        q = q_pids[start : start + chunk_size]
        if get_mAP:
            indices = torch.argsort(sim, dim=1, descending=True)
        else:
            indices = torch.topk(sim, k=width, dim=1, largest=True, sorted=True).indices
        matches = g_pids[indices] == q.view(-1, 1)
        cmc_hits += matches[:, :width].cumsum(1).clamp_(max=1).sum(0)
        if return_indices:
            index_parts.append(indices.cpu())
        if not get_mAP:
            continue
        num_rel = matches.sum(1)
        if bool((num_rel == 0).any()):
            missing = int(torch.nonzero(num_rel == 0)[0, 0]) + start
            raise ValueError(f"query {missing} has no correct gallery item, so mINP is undefined "
                             "(the official code fails here too)")
        hits_so_far = matches.cumsum(1)
        precision_at_k = hits_so_far.float() / positions  # official: tmp_cmc[:, i] / (i + 1.0)
        ap_parts.append((precision_at_k * matches).sum(1) / num_rel)
        # index of the last correct match = G - 1 - (first match position in the reversed row)
        last = num_g - 1 - matches.flip(1).to(torch.uint8).argmax(dim=1)
        inp_parts.append(hits_so_far.gather(1, last.view(-1, 1)).view(-1) / (last.float() + 1.0))
    cmc = (cmc_hits.float() / num_q * 100).cpu().numpy()
    indices_all = torch.cat(index_parts).numpy() if return_indices else None
    if not get_mAP:
        return RankResult(cmc=cmc, mAP=None, mINP=None, indices=indices_all)
    mean_ap = float(torch.cat(ap_parts).mean() * 100)
    mean_inp = float(torch.cat(inp_parts).mean() * 100)
    return RankResult(cmc=cmc, mAP=mean_ap, mINP=mean_inp, indices=indices_all)


def evaluate_t2i(text_feats: torch.Tensor | np.ndarray, image_feats: torch.Tensor | np.ndarray,
                 q_pids: torch.Tensor | np.ndarray, g_pids: torch.Tensor | np.ndarray,
                 max_rank: int = 10) -> dict[str, float]:
    """Official ``Evaluator.eval`` from embeddings: L2-normalise both sides, cosine ``text @ image.T``,
    then ``rank``; returns R1/R5/R10 (where defined), mAP and mINP in percent."""
    text = F.normalize(_as_tensor(text_feats).float(), p=2, dim=1)
    image = F.normalize(_as_tensor(image_feats).float(), p=2, dim=1)
    return rank(text @ image.t(), q_pids, g_pids, max_rank=max_rank).as_dict()
