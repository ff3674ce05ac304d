"""LAPS cross-modal scoring: per-image / per-caption states, a vectorised block scorer and a per-pair reference.

The released LAPS code (``lib/cross_net.py: CrossSparseAggrNet_v2``, ``lib/xttn.py: mask_xattn_one_text``)
computes, for one image and one caption (research notes section 2.5):

- selection score per spatial patch ``s_k = <norm(mean P), P^_k> + <norm(mean T), P^_k>``,
- kept set ``S`` = the ``K = ceil(N * sparse_ratio)`` highest scores (hard top-K), dropped set ``R``,
- one fused token ``f = sum_{k in R} softmax_R(s)_k P_k``,
- ``Nc`` aggregated tokens ``Y_c = sum_{k in S} softmax_S(z_{:,c})_k P_k`` with ``z = scale * MLP(P)``,
- tokens ``V = [cls (ViT only), Y_1..Y_Nc, f]``, each L2-normalised, words ``W^`` L2-normalised,
- ``A = LeakyReLU_0.1(W^ V^T)`` and ``S(I, T) = mean_words max_tokens A + mean_tokens max_words A`` (a sum).

Everything that does not depend on the caption is computed once per image (:class:`LapsImageState`), including
the aggregation-MLP logits of every patch (the MLP is token-wise, so this equals the official per-pair MLP on
the kept tokens). Two block scorers follow:

- :func:`score_block` forms the tokens with batched tensor ops; it is differentiable (training, the paper
  variant's straight-through decisions) and serves the parity cases and CUDA;
- :func:`score_block_delta` (inference on the CPU) never forms an aggregated token: each pair's kept set is a
  small difference from a text-free base set, so its token-word similarities and token norms are the base ones
  (computed once per image, or in one GEMM with all words) plus corrections over the differing patches.

:func:`score_matrix` chunks a large gallery so memory stays bounded. :func:`score_pair_reference` is the
straightforward per-pair loop body (gather, MLP, softmax, bmm as the official code does) used as the oracle.

Selection decisions follow float64 scores. The top-K set is then a deterministic function of the float32
embeddings, whatever the batch layout, so the block scorers and the per-pair loop choose identical sets (the
delta scorer ranks in float32 and re-decides in float64 only near the K-th boundary); the official float32
code chooses the same set except for pairs whose K-th and (K+1)-th scores are closer than float32 rounding
(~1e-7), where the official result itself depends on the kernel.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

LEAKY_RELU_SLOPE = 0.1  # lib/xttn.py mask_xattn_one_text: F.leaky_relu(..., negative_slope=0.1)
STATE_FORMAT_VERSION = 1


def num_kept_patches(num_patches: int, sparse_ratio: float) -> int:
    """K = ceil(N * sparse_ratio) (``TokenSparse.forward``): 98 of 196 (ViT, 0.5), 40 of 49 (Swin, 0.8)."""
    return math.ceil(num_patches * sparse_ratio)


def num_aggregated_tokens(num_patches: int, aggr_ratio: float, sparse_ratio: float) -> int:
    """Nc = int(N * aggr_ratio * sparse_ratio), evaluated left to right as the official constructor does."""
    return int(num_patches * aggr_ratio * sparse_ratio)


def has_cls_token(num_tokens: int) -> bool:
    """The official ``is_sqr`` test: a token count that is not a perfect square starts with a CLS token."""
    root = int(math.sqrt(num_tokens))
    return root * root != num_tokens


# --------------------------------------------------------------------------------------------- states


@dataclass
class LapsImageState:
    """Text-independent per-image tensors for a batch of ``I`` images (N spatial patches, width C).

    ``patches`` are the projected, unnormalised spatial tokens; ``cls`` the unnormalised CLS token (ViT) or None;
    ``aggr_logits`` = ``scale * MLP(patches)`` of ``cross_net.aggr_net`` [I, N, Nc]; ``patch_prior`` the paper
    variant's predicted significance in (0, 1) [I, N] or None. Normalised copies and the self-attention score
    ``<norm(mean P), P^_k>`` (float64) are derived from ``patches`` by :meth:`derive`.
    """

    patches: Tensor
    cls: Tensor | None
    aggr_logits: Tensor
    patch_prior: Tensor | None = None
    patches_norm: Tensor | None = None
    cls_norm: Tensor | None = None
    self_score: Tensor | None = None

    def __post_init__(self) -> None:
        if self.patches_norm is None or self.self_score is None:
            self.derive()

    def derive(self) -> None:
        """Normalised patches/CLS and the image self-attention score (``CrossSparseAggrNet_v2`` L134-156)."""
        self.patches_norm = F.normalize(self.patches, dim=-1)
        self.cls_norm = F.normalize(self.cls, dim=-1) if self.cls is not None else None
        with torch.no_grad():
            global_norm = F.normalize(self.patches.detach().mean(dim=1), dim=-1)  # [I, C]
            self.self_score = torch.einsum(
                "inc,ic->in", self.patches_norm.detach().double(), global_norm.double()
            )

    # -- shape helpers
    def __len__(self) -> int:
        return int(self.patches.shape[0])

    @property
    def num_patches(self) -> int:
        return int(self.patches.shape[1])

    @property
    def dim(self) -> int:
        return int(self.patches.shape[2])

    @property
    def num_aggregated(self) -> int:
        return int(self.aggr_logits.shape[2])

    def select(self, index: slice | Sequence[int] | Tensor) -> LapsImageState:
        """A sub-batch (slice or index list) sharing the derived tensors."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long, device=self.patches.device)

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[index]

        return LapsImageState(
            patches=self.patches[index], cls=pick(self.cls), aggr_logits=self.aggr_logits[index],
            patch_prior=pick(self.patch_prior), patches_norm=pick(self.patches_norm),
            cls_norm=pick(self.cls_norm), self_score=pick(self.self_score),
        )

    def to(self, device: torch.device | str) -> LapsImageState:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return LapsImageState(
            patches=move(self.patches), cls=move(self.cls), aggr_logits=move(self.aggr_logits),
            patch_prior=move(self.patch_prior), patches_norm=move(self.patches_norm),
            cls_norm=move(self.cls_norm), self_score=move(self.self_score),
        )

    @staticmethod
    def cat(states: Sequence[LapsImageState]) -> LapsImageState:
        """Concatenate batches (all with or all without CLS / prior)."""
        if not states:
            raise ValueError("no image states to concatenate")

        def join(name: str) -> Tensor | None:
            parts = [getattr(s, name) for s in states]
            if all(p is None for p in parts):
                return None
            if any(p is None for p in parts):
                raise ValueError(f"cannot concatenate image states with and without {name}")
            return torch.cat(parts, dim=0)

        return LapsImageState(
            patches=join("patches"), cls=join("cls"), aggr_logits=join("aggr_logits"),
            patch_prior=join("patch_prior"), patches_norm=join("patches_norm"),
            cls_norm=join("cls_norm"), self_score=join("self_score"),
        )

    # -- storage: what the service keeps per image
    def to_arrays(self, i: int) -> dict[str, np.ndarray]:
        """Image ``i`` as float32 numpy arrays (derived tensors are recomputed on load)."""
        arrays = {
            "patches": self.patches[i].detach().float().cpu().numpy(),
            "aggr_logits": self.aggr_logits[i].detach().float().cpu().numpy(),
        }
        if self.cls is not None:
            arrays["cls"] = self.cls[i].detach().float().cpu().numpy()
        if self.patch_prior is not None:
            arrays["patch_prior"] = self.patch_prior[i].detach().float().cpu().numpy()
        return arrays

    @staticmethod
    def from_arrays(items: Sequence[dict[str, np.ndarray]]) -> LapsImageState:
        """Inverse of :meth:`to_arrays` for one or more images."""
        if not items:
            raise ValueError("no image arrays")

        def stack(name: str) -> Tensor | None:
            if name not in items[0]:
                return None
            return torch.from_numpy(np.stack([np.asarray(it[name], dtype=np.float32) for it in items]))

        return LapsImageState(patches=stack("patches"), cls=stack("cls"), aggr_logits=stack("aggr_logits"),
                              patch_prior=stack("patch_prior"))

    def to_bytes(self, i: int) -> bytes:
        """Image ``i`` as a compact ``.npz`` blob (float32; about N*(C+Nc)*4 bytes)."""
        buffer = io.BytesIO()
        arrays = self.to_arrays(i)
        arrays["format_version"] = np.asarray([STATE_FORMAT_VERSION], dtype=np.int32)
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @staticmethod
    def from_bytes(blobs: bytes | Sequence[bytes]) -> LapsImageState:
        """One blob, or a list of blobs, from :meth:`to_bytes` back into a batched state."""
        if isinstance(blobs, (bytes, bytearray, memoryview)):
            blobs = [bytes(blobs)]
        items = []
        for blob in blobs:
            with np.load(io.BytesIO(blob)) as data:
                # blobs written before the version entry existed hold the same arrays (version 1)
                version = int(data["format_version"][0]) if "format_version" in data else 1
                if version != STATE_FORMAT_VERSION or "patches" not in data or "aggr_logits" not in data:
                    raise ValueError(f"unsupported LAPS image state format {version}")
                items.append({k: data[k] for k in data.files if k != "format_version"})
        return LapsImageState.from_arrays(items)


@dataclass
class LapsCaptionState:
    """Per-caption tensors for ``T`` captions: L2-normalised words (zero-padded to ``L``), their count, and the
    normalised mean of the unnormalised words (the text query of the cross-attention selection score).

    ``lengths`` are already capped at ``max_word`` (90): the official ``encode_data`` keeps only the first 90
    feature rows of a longer caption, and the cross-net slices ``[:cap_len]`` of that 90-row buffer.
    """

    words_norm: Tensor
    lengths: Tensor
    global_norm: Tensor

    @staticmethod
    def from_embeddings(cap_embs: Tensor, lengths: Sequence[int] | Tensor, max_word: int = 90) -> LapsCaptionState:
        """Build from projected BERT features [T, L, C] (unnormalised) and token counts incl. [CLS]/[SEP]."""
        lengths = torch.as_tensor(lengths, dtype=torch.long).clamp(max=max_word).to(cap_embs.device)
        if int(lengths.min()) < 1:
            raise ValueError("every caption needs at least one token")
        width = int(lengths.max())
        words = cap_embs[:, :width]
        mask = torch.arange(width, device=cap_embs.device)[None, :] < lengths[:, None]
        words = words * mask[..., None].to(words.dtype)  # rows past the length never take part
        mean = words.sum(dim=1) / lengths[:, None].to(words.dtype)
        return LapsCaptionState(
            words_norm=F.normalize(words, dim=-1), lengths=lengths, global_norm=F.normalize(mean, dim=-1)
        )

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def word_mask(self) -> Tensor:
        width = self.words_norm.shape[1]
        return torch.arange(width, device=self.lengths.device)[None, :] < self.lengths[:, None]

    def select(self, index: slice | Sequence[int] | Tensor) -> LapsCaptionState:
        """A sub-batch, trimmed to its own longest caption."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, dtype=torch.long, device=self.lengths.device)
        lengths = self.lengths[index]
        width = int(lengths.max()) if lengths.numel() else 1
        return LapsCaptionState(self.words_norm[:, :width][index], lengths, self.global_norm[index])

    def to(self, device: torch.device | str) -> LapsCaptionState:
        return LapsCaptionState(self.words_norm.to(device), self.lengths.to(device), self.global_norm.to(device))

    @staticmethod
    def cat(states: Sequence[LapsCaptionState]) -> LapsCaptionState:
        width = max(s.words_norm.shape[1] for s in states)
        words = [F.pad(s.words_norm, (0, 0, 0, width - s.words_norm.shape[1])) for s in states]
        return LapsCaptionState(torch.cat(words), torch.cat([s.lengths for s in states]),
                                torch.cat([s.global_norm for s in states]))


# --------------------------------------------------------------------------------------------- selection


@dataclass
class PaperSelection:
    """Parameters of the paper's patch selection (used only when ``selection == "paper"``).

    ``p_k = (1 - 2 beta) * prior_k + beta * ((1 + s_st_k) / 2 + (1 + s_im_k) / 2)`` is the keep probability of
    patch k (the significance-network score ``prior`` in (0, 1) combined with the text-relevance and image-salience
    cosines mapped to [0, 1]); the decision is a 2-way Gumbel-softmax over ``[log p, log(1 - p)]`` (temperature
    ``tau``): straight-through hard samples in training (soft gradients), ``p > 0.5`` at inference.
    """

    beta: float = 0.25
    tau: float = 1.0


def _official_keep(score: Tensor, keep_k: int) -> Tensor:
    """Hard top-K mask (``TokenSparse``: sort descending, keep the first K) as float 0/1 [..., N]."""
    index = score.topk(keep_k, dim=-1).indices
    return torch.zeros_like(score, dtype=torch.float32).scatter_(-1, index, 1.0)


def paper_keep_probability(prior: Tensor, score_st: Tensor, self_score: Tensor, beta: float) -> Tensor:
    """``(1 - 2 beta) prior + beta ((1 + s_st) / 2 + (1 + s_im) / 2)`` in float64, clamped away from 0 and 1."""
    p = (1.0 - 2.0 * beta) * prior.double() + beta * ((1.0 + score_st.double()) / 2.0
                                                      + (1.0 + self_score.double()) / 2.0)
    return p.clamp(1e-6, 1.0 - 1e-6)


def _paper_keep(score_st: Tensor, self_score: Tensor, prior: Tensor, params: PaperSelection,
                training: bool) -> Tensor:
    """Paper decision matrix D (keep column) [..., N]: Gumbel-softmax (ST) in training, argmax at inference."""
    p = paper_keep_probability(prior, score_st, self_score, params.beta)
    if not training:
        return (p > 0.5).to(torch.float32)
    logits = torch.stack([p.log(), (1.0 - p).log()], dim=-1)
    return F.gumbel_softmax(logits, tau=params.tau, hard=True, dim=-1)[..., 0].float()


def masked_softmax(logits: Tensor, keep: Tensor, dim: int) -> Tensor:
    """Softmax over the entries with ``keep == 1`` (the official gather-then-softmax over the kept set).

    Exact for any logit range; used when the shifted-exponential path of :func:`score_block` could underflow.
    An empty kept set gives all-zero weights.
    """
    masked = logits.masked_fill(keep <= 0, float("-inf"))
    top = masked.amax(dim=dim, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).detach()
    weights = torch.exp(masked - top) * keep  # `* keep` carries straight-through gradients in training
    return weights / weights.sum(dim=dim, keepdim=True).clamp_min(1e-30)


# the shifted exponentials exp(z - max_all z) stay normal floats (> 1e-35) for logit ranges below this
SAFE_LOGIT_RANGE = 80.0


# --------------------------------------------------------------------------------------------- scoring


def _inverse_norm(norms: Tensor, weight_sums: Tensor) -> Tensor:
    """``1 / max(|x|, 1e-12 * d)`` from ``|x|``: with unnormalised weights summing to ``d``, ``x * this`` equals
    ``F.normalize(x / d)`` (eps 1e-12) exactly in exact arithmetic."""
    return 1.0 / torch.maximum(norms, 1e-12 * weight_sums).clamp_min(1e-30)


@dataclass
class BlockResult:
    scores: Tensor  # [I, T] float32
    keep: Tensor | None  # [I, T, N] kept-patch mask (float 0/1, or straight-through in paper training)


def score_block(
    images: LapsImageState,
    captions: LapsCaptionState,
    keep_k: int,
    selection: str = "official",
    paper: PaperSelection | None = None,
    training: bool = False,
    return_keep: bool = False,
) -> BlockResult:
    """LAPS scores of every (image, caption) pair of one block with batched tensor ops.

    The softmax weights are used unnormalised, ``exp(z - max_N z)`` times the 0/1 keep mask, and their sums are
    folded into the final L2 normalisation (``F.normalize(x / d) == x / max(|x|, 1e-12 * d)``), so the per-pair
    work is one mask multiply, one GEMM per image for the tokens and one batched matmul per image for the
    matching (the CLS and fused tokens are matched separately, which avoids concatenation copies).
    Memory is O(I * T * (Nc + 1) * max(N, C)); use :func:`score_matrix` to chunk large inputs.
    """
    num_img, num_cap = len(images), len(captions)
    num_patches, dim = images.num_patches, images.dim
    # 1. selection score s = s_im + s_st (float64, see module docstring) and keep decision [I, T, N]
    score_st = torch.einsum(
        "inc,tc->itn", images.patches_norm.detach().double(), captions.global_norm.detach().double()
    )
    score = images.self_score[:, None, :] + score_st
    if selection == "official":
        keep = _official_keep(score, keep_k)
    elif selection == "paper":
        if images.patch_prior is None or paper is None:
            raise ValueError("paper selection needs image states with patch_prior and PaperSelection params")
        keep = _paper_keep(score_st, images.self_score[:, None, :], images.patch_prior[:, None, :], paper, training)
    else:
        raise ValueError(f"unknown selection {selection!r}")
    keep = keep.to(images.patches.dtype)
    # 2. token weights: Nc aggregation slots (softmax of scale * MLP(P) over the kept set) [I, T, Nc, N] and the
    #    fused token (softmax of the selection score over the dropped set, temperature 1) [I, T, N]
    logits = images.aggr_logits.transpose(1, 2)  # [I, Nc, N]
    num_slots = logits.shape[1]
    score32 = score.to(images.patches.dtype)
    fuse = torch.exp(score32 - score32.amax(dim=-1, keepdim=True)) * (1.0 - keep)  # |s| <= 2: no underflow
    spread = (logits.detach().amax(dim=-1) - logits.detach().amin(dim=-1)).max() if logits.numel() else 0.0
    if float(spread) < SAFE_LOGIT_RANGE:
        shifted = torch.exp(logits - logits.detach().amax(dim=-1, keepdim=True))  # [I, Nc, N]
        aggr = shifted[:, None, :, :] * keep[:, :, None, :]
        aggr_sums = torch.bmm(keep, shifted.transpose(1, 2))  # [I, T, Nc]
    else:  # extreme logits: exact masked softmax, weights already normalised
        aggr = masked_softmax(logits[:, None], keep[:, :, None, :], dim=-1)
        aggr_sums = torch.ones(num_img, num_cap, num_slots, dtype=keep.dtype, device=keep.device)
    # 3. unnormalised tokens: one GEMM per image over all its captions [I, T, Nc, C], and the fused token [I, T, C]
    aggregated = torch.bmm(aggr.reshape(num_img, num_cap * num_slots, num_patches), images.patches)
    aggregated = aggregated.view(num_img, num_cap, num_slots, dim)
    fused = torch.bmm(fuse, images.patches)
    aggr_scale = _inverse_norm(torch.linalg.vector_norm(aggregated, dim=-1), aggr_sums)
    fused_scale = _inverse_norm(torch.linalg.vector_norm(fused, dim=-1), fuse.sum(dim=-1))
    # 4. patch-word matching (mask_xattn_one_text): A = LeakyReLU(W^ V^T), V = [cls, Y_1..Y_Nc, f]
    words_t = captions.words_norm.transpose(1, 2)  # [T, C, L]
    aggr_sims = torch.stack([torch.bmm(aggregated[i], words_t) for i in range(num_img)])  # [I, T, Nc, L]
    aggr_sims = F.leaky_relu(aggr_sims * aggr_scale[..., None], negative_slope=LEAKY_RELU_SLOPE)
    extra = [torch.einsum("itc,tlc->itl", fused, captions.words_norm) * fused_scale[..., None]]
    if images.cls_norm is not None:  # the CLS token takes part in the matching only
        extra.append(torch.einsum("ic,tlc->itl", images.cls_norm, captions.words_norm))
    extra_sims = F.leaky_relu(torch.stack(extra, dim=2), negative_slope=LEAKY_RELU_SLOPE)  # [I, T, 1|2, L]
    scores = mean_of_max_score(aggr_sims, extra_sims, captions.word_mask, captions.lengths)
    return BlockResult(scores=scores, keep=keep if return_keep else None)


def mean_of_max_score(aggr_sims: Tensor, extra_sims: Tensor, word_mask: Tensor, lengths: Tensor) -> Tensor:
    """``mean_words max_tokens A + mean_tokens max_words A`` (``mask_xattn_one_text``) from LeakyReLU'd matching
    scores laid out [..., tokens, words]: the aggregated tokens and the extra ones (fused, CLS) given apart so
    neither needs a concatenated copy. ``word_mask`` [T, L] and ``lengths`` [T] describe the captions, whose
    axis is the last one of ``...``; padding words take part in neither maximum."""
    hide_padding = ~word_mask.unsqueeze(-2)  # [T, 1, L]
    best_token_per_word = torch.maximum(aggr_sims.amax(dim=-2), extra_sims.amax(dim=-2))  # [..., L]
    token_sum = (aggr_sims.masked_fill(hide_padding, float("-inf")).amax(dim=-1).sum(dim=-1)
                 + extra_sims.masked_fill(hide_padding, float("-inf")).amax(dim=-1).sum(dim=-1))
    word_term = (best_token_per_word * word_mask).sum(dim=-1) / lengths.to(aggr_sims.dtype)
    return word_term + token_sum / (aggr_sims.shape[-2] + extra_sims.shape[-2])


# float32 selection scores within this of the K-th / (K+1)-th boundary are re-decided in float64 (the float32
# error of a 512-1024-term dot product of unit vectors is ~1e-6 in practice; 3e-5 is the worst-case bound at 512)
SELECTION_MARGIN = 6e-5


@dataclass
class DeltaImageFactors:
    """Text-independent factors of one image block for :func:`score_block_delta`.

    The base kept set ``S0`` of each image is the top-K by the image self-score alone. A caption's kept set ``S``
    differs from it in a few patches (the text term only reorders patches near the K-th place), so every quantity
    of the aggregated tokens is the base one plus a correction over ``S xor S0``. With ``e_c`` the exp-shifted
    aggregation weights and ``U0_c = sum_{k in S0} e_ck P_k`` the base (unnormalised) tokens, this holds:
    ``patches_flat`` [I*N, C] and ``patches_norm_t`` [C, I*N]; ``base_keep`` [I, N]; ``slot_weights_flat``
    ``e`` laid out [I*N, Nc]; ``base_tokens_t`` ``U0^T`` [C, I*Nc]; ``base_sq_norms`` ``|U0_c|^2`` and
    ``base_sums`` ``sum_{S0} e_ck`` [I, Nc]; ``base_cross_flat`` ``<U0_c, P_k>`` [I*N, Nc]; ``gram_flat`` the
    patch Gram matrices ``P P^T`` [I*N*N].
    """

    patches_flat: Tensor
    patches_norm_t: Tensor
    base_keep: Tensor
    slot_weights_flat: Tensor
    base_tokens_t: Tensor
    base_sq_norms: Tensor
    base_sums: Tensor
    base_cross_flat: Tensor
    gram_flat: Tensor

    @staticmethod
    def build(images: LapsImageState, keep_k: int) -> DeltaImageFactors:
        patches = images.patches
        num_img, num_patches, dim = patches.shape
        logits = images.aggr_logits.transpose(1, 2)  # [I, Nc, N]
        slot_weights = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
        num_slots = slot_weights.shape[1]
        base_keep = _official_keep(images.self_score, min(keep_k, num_patches)).to(patches.dtype)
        base_weights = slot_weights * base_keep[:, None, :]
        base_tokens = torch.bmm(base_weights, patches)  # [I, Nc, C]
        return DeltaImageFactors(
            patches_flat=patches.reshape(num_img * num_patches, dim),
            patches_norm_t=images.patches_norm.reshape(num_img * num_patches, dim).T.contiguous(),
            base_keep=base_keep,
            slot_weights_flat=slot_weights.transpose(1, 2).reshape(num_img * num_patches, num_slots).contiguous(),
            base_tokens_t=base_tokens.reshape(num_img * num_slots, dim).T.contiguous(),
            base_sq_norms=(base_tokens * base_tokens).sum(dim=-1),
            base_sums=base_weights.sum(dim=-1),
            base_cross_flat=torch.bmm(patches, base_tokens.transpose(1, 2)).reshape(num_img * num_patches, num_slots),
            gram_flat=torch.bmm(patches, patches.transpose(1, 2)).reshape(-1),
        )


def _keep_from_float32(score: Tensor, keep_k: int, exact_score: Callable[[Tensor], Tensor]) -> Tensor:
    """Top-K keep mask (float 0/1, last dim) from float32 scores: ``np.partition`` finds the K-th largest value
    (introselect: several times faster than ``torch.topk`` here); rows whose K-th and (K+1)-th values are
    closer than :data:`SELECTION_MARGIN` are re-decided by ``exact_score(row_index)`` (float64)."""
    num_patches = score.shape[-1]
    if keep_k >= num_patches:
        return torch.ones_like(score)
    flat = score.reshape(-1, num_patches)
    boundary = np.partition(flat.numpy(), (num_patches - keep_k - 1, num_patches - keep_k), axis=-1)
    threshold = torch.from_numpy(boundary[:, num_patches - keep_k].copy())
    keep = (flat >= threshold[:, None]).to(score.dtype)
    close = np.flatnonzero(boundary[:, num_patches - keep_k] - boundary[:, num_patches - keep_k - 1]
                           < SELECTION_MARGIN)
    if len(close):
        rows = torch.from_numpy(close)
        keep[rows] = _official_keep(exact_score(rows), keep_k)
    return keep.view(score.shape)


@dataclass
class DeltaSelection:
    """The text-dependent per-pair quantities that do not involve the words themselves, for T captions x I images:
    the fused-token weights [T, I, N] (``exp(s - max s)`` on the dropped patches, 0 on the kept ones) and the
    difference of the kept set from the base set: ``delta_index`` [T, I, D] flat patch indices (into I*N, the
    differing patches first), ``delta_sign`` [T, I, D] (+1 added, -1 removed, 0 padding) and ``delta_count``
    [T, I]."""

    fuse: Tensor
    delta_index: Tensor
    delta_sign: Tensor
    delta_count: Tensor

    def rows(self, start: int, end: int) -> DeltaSelection:
        return DeltaSelection(self.fuse[start:end], self.delta_index[start:end], self.delta_sign[start:end],
                              self.delta_count[start:end])


# Below this many captions the per-image factors of the delta scorer (patch Gram matrices: N*N*C per image) cost
# more than forming the tokens directly: re-ranking 250 ViT images for 1 / 4 / 16 captions on one thread took
# 1.07 / 1.44 / 2.82 s through the delta scorer and 0.58 / 0.96 / 3.14 s through score_block.
DELTA_MIN_CAPTIONS = 12


def delta_applies(images: LapsImageState) -> bool:
    """The delta scorer runs on the CPU and needs exp-shifted aggregation weights that cannot underflow."""
    logits = images.aggr_logits
    spread = float((logits.amax(dim=1) - logits.amin(dim=1)).max()) if logits.numel() else 0.0
    return images.patches.device.type == "cpu" and spread < SAFE_LOGIT_RANGE


def delta_selection(images: LapsImageState, text_queries: Tensor, keep_k: int, factors: DeltaImageFactors,
                    selection: str = "official", paper: PaperSelection | None = None) -> DeltaSelection:
    """Selection and fused-token weights for the text queries ``norm(mean T)`` [T, C], and each pair's kept set as
    a difference from the base set of :class:`DeltaImageFactors`.

    Official selection ranks float32 scores (one GEMM for all captions) and re-decides near-ties in float64, so the
    kept sets are the float64 top-K of the per-pair loop; paper selection is decided in float64.
    """
    num_img, num_cap, num_patches = len(images), text_queries.shape[0], images.num_patches
    # s = <norm(mean P), P^_k> + <norm(mean T), P^_k> [T, I, N]
    score = torch.matmul(text_queries, factors.patches_norm_t).view(num_cap, num_img, num_patches)
    score = score + images.self_score.float()[None]
    if selection == "official":
        def exact_score(rows: Tensor) -> Tensor:
            """float64 selection scores of the (caption, image) rows ``t * I + i``, one GEMM per image."""
            t, i = rows // num_img, rows % num_img
            exact = torch.empty(len(rows), num_patches, dtype=torch.float64)
            for image in i.unique().tolist():
                pick = (i == image).nonzero()[:, 0]
                queries = text_queries[t[pick]].double()
                exact[pick] = images.patches_norm[image].double().matmul(queries.T).T + images.self_score[image]
            return exact

        keep = _keep_from_float32(score, keep_k, exact_score)
    elif selection == "paper":
        if images.patch_prior is None or paper is None:
            raise ValueError("paper selection needs image states with patch_prior and PaperSelection params")
        score_st = torch.einsum("inc,tc->tin", images.patches_norm.double(), text_queries.double())
        keep = _paper_keep(score_st, images.self_score[None], images.patch_prior[None], paper, False)
        score = (images.self_score[None] + score_st).float()
    else:
        raise ValueError(f"unknown selection {selection!r}")
    fuse = torch.exp(score - score.amax(dim=-1, keepdim=True)) * (1.0 - keep)  # [T, I, N]; |s| <= 2
    delta = keep - factors.base_keep[None]  # [T, I, N] in {-1, 0, 1}
    changed = delta.abs()
    delta_count = changed.sum(dim=-1).to(torch.int64)
    width = int(delta_count.max()) if delta_count.numel() else 0
    index = changed.topk(width, dim=-1).indices  # the changed patches first (their |delta| is 1, the rest 0)
    sign = delta.gather(-1, index)  # 0 on padding
    index = index + (torch.arange(num_img) * num_patches)[None, :, None]
    return DeltaSelection(fuse, index, sign, delta_count)


def score_block_delta(
    images: LapsImageState,
    captions: LapsCaptionState,
    keep_k: int,
    selection: str = "official",
    paper: PaperSelection | None = None,
    factors: DeltaImageFactors | None = None,
    selected: DeltaSelection | None = None,
    caption_batch: int = 8,
) -> Tensor:
    """Inference-only LAPS scores [I, T] of one block from the base tokens and each pair's kept-set difference.

    Same result as :func:`score_block` (to float32 rounding) without forming any token. With ``U_c`` the
    unnormalised aggregated token of a pair, ``U0_c`` the base token and ``delta_k`` = +1 / -1 for the patches the
    caption adds to / removes from the base set (``D`` of them, about 20 of 196 for ViT):

    - ``<U_c, w> = <U0_c, w> + sum_k delta_k e_ck <P_k, w>``: one GEMM of all words with all base tokens
      (Nc*C*L multiply-adds per pair) plus the gathered differing patches times the words (D*C*L);
    - ``|U_c|^2 = |U0_c|^2 + 2 sum_k delta_k e_ck <U0_c, P_k> + sum_kk' delta_k delta_k' e_ck e_ck' G_kk'`` from
      precomputed ``<U0_c, P_k>`` and the patch Gram matrix (Nc*D^2);
    - the fused token formed directly (N*C), as its weights change with every caption.

    Pairs go ``caption_batch`` captions (x all images) at a time, each batch padded to its own largest ``D``.
    Falls back to :func:`score_block` where exp-shifted aggregation weights could underflow.
    """
    if selection not in ("official", "paper"):
        raise ValueError(f"unknown selection {selection!r}")
    if not delta_applies(images):
        return score_block(images, captions, keep_k, selection, paper).scores
    if factors is None:
        factors = DeltaImageFactors.build(images, keep_k)
    if selected is None:
        selected = delta_selection(images, captions.global_norm, keep_k, factors, selection, paper)
    num_img, num_cap = len(images), len(captions)
    num_patches, dim, num_slots = images.num_patches, images.dim, images.num_aggregated
    words = captions.words_norm  # [T, L, C], zero rows past each length
    num_words = words.shape[1]
    word_rows = words.reshape(num_cap * num_words, dim)
    # base token-word similarities [T, I, L, Nc] (one GEMM), corrected below batch by batch
    aggr_sims = torch.matmul(word_rows, factors.base_tokens_t).view(num_cap, num_words, num_img, num_slots)
    aggr_sims = aggr_sims.transpose(1, 2).contiguous()
    sq_norms = factors.base_sq_norms[None].repeat(num_cap, 1, 1)  # [T, I, Nc]
    weight_sums = factors.base_sums[None].repeat(num_cap, 1, 1)
    widest = int(selected.delta_count.max()) if num_cap else 0
    gathered = torch.empty(min(caption_batch, num_cap) * num_img * widest * dim, dtype=words.dtype)
    for t0 in range(0, num_cap, caption_batch):
        t1 = min(t0 + caption_batch, num_cap)
        width = int(selected.delta_count[t0:t1].max())
        if width == 0:
            continue
        index = selected.delta_index[t0:t1, :, :width]  # [t, I, D]
        flat = index.reshape(-1)
        shape = (t1 - t0, num_img, width)
        coeff = (factors.slot_weights_flat.index_select(0, flat).view(*shape, num_slots)
                 * selected.delta_sign[t0:t1, :, :width, None])  # delta_k e_ck [t, I, D, Nc]
        patches = torch.index_select(factors.patches_flat, 0, flat, out=gathered[:flat.numel() * dim].view(-1, dim))
        patch_words = torch.bmm(words[t0:t1], patches.view(t1 - t0, num_img * width, dim).transpose(1, 2))
        patch_words = patch_words.view(t1 - t0, num_words, num_img, width).transpose(1, 2)  # [t, I, L, D]
        aggr_sims[t0:t1] += torch.matmul(patch_words, coeff)
        cross = (coeff * factors.base_cross_flat.index_select(0, flat).view(*shape, num_slots)).sum(dim=2)
        gram = factors.gram_flat.take((index * num_patches)[..., :, None] + (index % num_patches)[..., None, :])
        quad = (torch.matmul(gram, coeff) * coeff).sum(dim=2)  # [t, I, Nc]
        sq_norms[t0:t1] += 2.0 * cross + quad
        weight_sums[t0:t1] += coeff.sum(dim=2)
    aggr_scale = _inverse_norm(sq_norms.clamp_min(0.0).sqrt(), weight_sums)  # [T, I, Nc]
    aggr_sims = F.leaky_relu(aggr_sims * aggr_scale[:, :, None, :], negative_slope=LEAKY_RELU_SLOPE)
    # the fused token, formed: one GEMM per image over all captions [I, T, C]
    fused = torch.bmm(selected.fuse.transpose(0, 1), images.patches)
    fused_scale = _inverse_norm(torch.linalg.vector_norm(fused, dim=-1), selected.fuse.sum(dim=-1).T)  # [I, T]
    extra = [torch.bmm(words, (fused * fused_scale[..., None]).permute(1, 2, 0))]  # [T, L, I]
    if images.cls_norm is not None:  # the CLS token takes part in the matching only
        extra.append(torch.matmul(word_rows, images.cls_norm.T).view(num_cap, num_words, num_img))
    extra_sims = F.leaky_relu(torch.stack(extra, dim=-1), negative_slope=LEAKY_RELU_SLOPE)  # [T, L, I, E]
    # matching: A = LeakyReLU(W^ V^T); mean over words of the best token + mean over tokens of the best word
    return mean_of_max_score(aggr_sims.permute(1, 0, 3, 2), extra_sims.permute(2, 0, 3, 1), captions.word_mask,
                             captions.lengths)


def text_free_tokens(images: LapsImageState, keep_k: int) -> Tensor:
    """The matching tokens an image yields when the text term of the selection score is left out.

    Selection by the image self-attention score alone (top-K), then the official aggregation, fused token and
    CLS: [I, V, C], L2-normalised. Used for the candidate-stage vector, which only sees the image.
    """
    score = images.self_score
    keep = _official_keep(score, keep_k).to(images.patches.dtype)  # the delta scorer's base set as well
    aggr = masked_softmax(images.aggr_logits.transpose(1, 2), keep[:, None, :], dim=-1)  # [I, Nc, N]
    fuse = masked_softmax(score.to(images.patches.dtype), 1.0 - keep, dim=-1)  # [I, N]
    tokens = torch.bmm(torch.cat([aggr, fuse[:, None, :]], dim=1), images.patches)
    if images.cls is not None:
        tokens = torch.cat([images.cls[:, None, :], tokens], dim=1)
    return F.normalize(tokens, dim=-1)


def candidate_image_vectors(images: LapsImageState, keep_k: int) -> Tensor:
    """Candidate-stage image vector: the normalised mean of :func:`text_free_tokens` [I, C]."""
    return F.normalize(text_free_tokens(images, keep_k).mean(dim=1), dim=-1)


def candidate_caption_vectors(captions: LapsCaptionState) -> Tensor:
    """Candidate-stage caption vector: the normalised mean of the normalised words (first 90) [T, C].

    Its inner product with :func:`candidate_image_vectors` is, up to the two norms, the mean cosine of every
    word with every token: the mean-of-means relaxation of LAPS's mean-of-max score.
    """
    mean = captions.words_norm.sum(dim=1) / captions.lengths[:, None].to(captions.words_norm.dtype)
    return F.normalize(mean, dim=-1)


def _bytes_per_pair(images: LapsImageState, max_words: int) -> int:
    """Rough working set of one pair in :func:`score_block`: aggregation weights [Nc, N], tokens [Nc, C],
    three copies of the match matrix [Nc + 2, L], and the float64 / float32 per-patch scores."""
    n, c, nc = images.num_patches, images.dim, images.num_aggregated
    return 4 * (nc * n + nc * c + 3 * (nc + 2) * max_words + 4 * n) + 8 * 2 * n


def _caption_chunks(sorted_lengths: list[int], max_words: int) -> list[tuple[int, int]]:
    """Greedy [start, end) runs of length-sorted captions whose padded size (count x longest) stays within
    ``max_words`` (a caption longer than that gets a run of its own)."""
    runs, start = [], 0
    while start < len(sorted_lengths):
        end = start + 1
        while end < len(sorted_lengths) and (end + 1 - start) * sorted_lengths[end] <= max_words:
            end += 1
        runs.append((start, end))
        start = end
    return runs


def score_matrix(
    images: LapsImageState,
    captions: LapsCaptionState,
    keep_k: int,
    selection: str = "official",
    paper: PaperSelection | None = None,
    max_chunk_bytes: int = 256 * 2**20,
    image_chunk: int = 8,
    progress: Callable[[int], None] | None = None,
    max_block_words: int = 2048,
    workers: int = 1,
) -> Tensor:
    """All-pairs LAPS scores [I, T] (float32, on the states' device) in bounded memory.

    Captions are processed in length order (little padding) and images in chunks of ``image_chunk``. On the CPU,
    with at least :data:`DELTA_MIN_CAPTIONS` captions, each block goes through :func:`score_block_delta`
    (text-independent factors and the selection of all captions built once per image chunk; a block holds at most
    ``max_block_words`` padded words, fewer if its word x token buffers would exceed ``max_chunk_bytes``);
    otherwise through :func:`score_block`, sized to ``max_chunk_bytes``.
    ``progress(n_pairs_done)`` is called per block. ``workers > 1`` (CPU) scores image chunks on that many
    Python threads with one torch thread each, instead of torch's intra-op threads; it sets the process-wide
    torch thread count for the duration, so use it only where nothing else runs torch at the same time (the
    evaluation CLI, benchmarks).
    """
    num_img, num_cap = len(images), len(captions)
    out = torch.empty(num_img, num_cap, dtype=torch.float32, device=images.patches.device)
    if num_img == 0 or num_cap == 0:
        return out
    order = torch.argsort(captions.lengths.cpu(), stable=True)
    chunk_starts = range(0, num_img, image_chunk)
    if images.patches.device.type != "cpu":
        with torch.no_grad():
            for i0 in chunk_starts:
                _score_chunk_direct(images.select(slice(i0, min(i0 + image_chunk, num_img))), i0, captions, order,
                                    keep_k, selection, paper, max_chunk_bytes, out, progress)
        return out
    # caption runs are the same for every image chunk: select (copy, trim) them once
    bytes_per_word = 4 * 3 * min(image_chunk, num_img) * (images.num_aggregated + 2)  # [T, I, L, Nc + 2] x 3
    budget = max(1, min(max_block_words, max_chunk_bytes // bytes_per_word))
    runs = [(t0, t1, captions.select(order[t0:t1].to(captions.lengths.device)))
            for t0, t1 in _caption_chunks(captions.lengths[order].tolist(), budget)]

    sorted_queries = captions.global_norm[order.to(captions.global_norm.device)]

    def score_image_chunk(i0: int) -> None:
        with torch.no_grad():
            img_block = images.select(slice(i0, min(i0 + image_chunk, num_img)))
            if num_cap < DELTA_MIN_CAPTIONS or not delta_applies(img_block):
                _score_chunk_direct(img_block, i0, captions, order, keep_k, selection, paper, max_chunk_bytes, out,
                                    progress)
                return
            factors = DeltaImageFactors.build(img_block, keep_k)
            # selection of all captions at once (one tall GEMM), in caption-length order
            selected = delta_selection(img_block, sorted_queries, keep_k, factors, selection, paper)
            for t0, t1, block_captions in runs:
                block = score_block_delta(img_block, block_captions, keep_k, selection, paper, factors,
                                          selected=selected.rows(t0, t1))
                out[i0:i0 + len(img_block), order[t0:t1]] = block
                if progress is not None:
                    progress(len(img_block) * (t1 - t0))

    if workers <= 1:
        for i0 in chunk_starts:
            score_image_chunk(i0)
        return out
    threads_before = torch.get_num_threads()

    def worker(starts: Sequence[int]) -> None:
        torch.set_num_threads(1)
        for i0 in starts:
            score_image_chunk(i0)

    try:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(worker, [chunk_starts[w::workers] for w in range(workers)]))
    finally:
        torch.set_num_threads(threads_before)
    return out


def _score_chunk_direct(img_block: LapsImageState, i0: int, captions: LapsCaptionState, order: Tensor, keep_k: int,
                        selection: str, paper: PaperSelection | None, max_chunk_bytes: int, out: Tensor,
                        progress: Callable[[int], None] | None) -> None:
    """One image chunk of :func:`score_matrix` through :func:`score_block` (off the CPU)."""
    num_cap, t0 = len(captions), 0
    while t0 < num_cap:  # size the block by the longest caption it could contain
        max_words = int(captions.lengths[order[min(t0 + 4096, num_cap) - 1]])
        per_block = max(1, max_chunk_bytes // (_bytes_per_pair(img_block, max_words) * len(img_block)))
        t1 = min(t0 + per_block, num_cap)
        index = order[t0:t1].to(captions.lengths.device)
        block = score_block(img_block, captions.select(index), keep_k, selection, paper).scores
        out[i0:i0 + len(img_block), index.to(out.device)] = block
        if progress is not None:
            progress(len(img_block) * (t1 - t0))
        t0 = t1


def score_pair_reference(
    images: LapsImageState,
    image_index: int,
    captions: LapsCaptionState,
    caption_index: int,
    keep_k: int,
    aggr_mlp: Callable[[Tensor], Tensor],
    aggr_scale: Tensor,
    selection: str = "official",
    paper: PaperSelection | None = None,
) -> float:
    """One pair, step by step as ``CrossSparseAggrNet_v2.forward`` does it.

    Gathers the kept patches (official: sort the selection score, keep the first K; paper, inference: keep
    probability above 1/2), runs the aggregation MLP on them (not the precomputed logits), softmaxes over the
    kept set, fuses the dropped patches, normalises and matches.
    """
    patches = images.patches[image_index]  # [N, C]
    patches_norm = images.patches_norm[image_index]
    n_words = int(captions.lengths[caption_index])
    words_norm = captions.words_norm[caption_index, :n_words]  # [n, C]
    score_st = patches_norm.double() @ captions.global_norm[caption_index].double()
    score = images.self_score[image_index] + score_st  # [N]
    if selection == "paper":
        if paper is None or images.patch_prior is None:
            raise ValueError("paper selection needs PaperSelection params and a patch prior")
        p = paper_keep_probability(images.patch_prior[image_index], score_st, images.self_score[image_index],
                                   paper.beta)
        kept_mask = p > 0.5
        kept, dropped = kept_mask.nonzero()[:, 0], (~kept_mask).nonzero()[:, 0]
    else:
        order = torch.sort(score, descending=True).indices
        kept, dropped = order[:keep_k], order[keep_k:]
    kept_tokens = patches[kept]  # [K, C]
    weights = (aggr_mlp(kept_tokens[None])[0].transpose(0, 1) * aggr_scale.reshape(())).softmax(dim=-1)
    aggregated = weights @ kept_tokens  # [Nc, C]
    fuse = score[dropped].to(patches.dtype).softmax(dim=0)
    fused = (patches[dropped] * fuse[:, None]).sum(dim=0, keepdim=True)  # [1, C]
    tokens = [aggregated, fused]
    if images.cls is not None:
        tokens.insert(0, images.cls[image_index][None])
    tokens = F.normalize(torch.cat(tokens, dim=0), dim=-1)  # [V, C]
    sims = F.leaky_relu(words_norm @ tokens.T, negative_slope=LEAKY_RELU_SLOPE)  # [n, V]
    return float(sims.max(dim=1).values.mean() + sims.max(dim=0).values.mean())


def score_matrix_reference(
    images: LapsImageState,
    captions: LapsCaptionState,
    keep_k: int,
    aggr_mlp: Callable[[Tensor], Tensor],
    aggr_scale: Tensor,
    selection: str = "official",
    paper: PaperSelection | None = None,
) -> Tensor:
    """The per-pair loop over every (image, caption): the oracle for :func:`score_matrix`."""
    out = torch.empty(len(images), len(captions), dtype=torch.float32)
    with torch.no_grad():
        for i in range(len(images)):
            for t in range(len(captions)):
                out[i, t] = score_pair_reference(images, i, captions, t, keep_k, aggr_mlp, aggr_scale,
                                                 selection, paper)
    return out


def score_matrix_per_caption(
    images: LapsImageState,
    captions: LapsCaptionState,
    keep_k: int,
    aggr_mlp: Callable[[Tensor], Tensor],
    aggr_scale: Tensor,
    shard_size: int = 256,
) -> Tensor:
    """The official evaluation strategy (``shard_attn_scores`` + ``CrossSparseAggrNet_v2.forward``): a Python
    loop over captions, each scored against a shard of up to 256 images at once (sort, gather, MLP on the
    kept patches). A benchmark baseline; same numbers as :func:`score_matrix`."""
    out = torch.empty(len(images), len(captions), dtype=torch.float32)
    dim = images.dim
    with torch.no_grad():
        for i0 in range(0, len(images), shard_size):
            shard = images.select(slice(i0, min(i0 + shard_size, len(images))))
            patches, patches_norm = shard.patches, shard.patches_norm.double()
            for t in range(len(captions)):
                n_words = int(captions.lengths[t])
                words = captions.words_norm[t, :n_words]
                score_st = patches_norm @ captions.global_norm[t].double()  # [B, N]
                score = shard.self_score + score_st
                order = torch.sort(score, dim=1, descending=True).indices
                kept, dropped = order[:, :keep_k], order[:, keep_k:]
                selected = torch.gather(patches, 1, kept[..., None].expand(-1, -1, dim))
                weights = (aggr_mlp(selected).transpose(1, 2) * aggr_scale).softmax(dim=-1)
                tokens = [torch.bmm(weights, selected)]
                fuse = torch.gather(score, 1, dropped).to(patches.dtype).softmax(dim=-1)
                rest = torch.gather(patches, 1, dropped[..., None].expand(-1, -1, dim))
                tokens.append((rest * fuse[..., None]).sum(dim=1, keepdim=True))
                if shard.cls is not None:
                    tokens.insert(0, shard.cls[:, None])
                tokens = F.normalize(torch.cat(tokens, dim=1), dim=-1)  # [B, V, C]
                sims = F.leaky_relu(torch.matmul(words, tokens.transpose(1, 2)), negative_slope=LEAKY_RELU_SLOPE)
                out[i0:i0 + len(shard), t] = sims.amax(dim=2).mean(dim=1) + sims.amax(dim=1).mean(dim=1)
    return out
