"""FAISS vector index with int64 ids, incremental add/delete, exact scores and atomic snapshots.

Kinds (chosen by size, see ``choose_kind``):
- ``flat``: ``IndexIDMap2(IndexFlatIP)`` - exact; the default for small and medium galleries.
- ``ivf``: ``IndexIVFFlat`` (inner product) - probes ``nprobe`` of ``nlist`` cells; the vectors are kept
  unquantised, so every returned score is exact (re-ranking is built in); supports ``remove_ids``.
- ``hnsw``: ``IndexHNSWFlat`` behind an id map; deletes are tombstones filtered at search time and the
  graph is rebuilt by ``compact()``.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import faiss
import numpy as np

# Batched flat search takes faiss' BLAS path only above this nq*d product; the default (128000) keeps
# 64-query batches on the slow path (research/environment.md section 5).
faiss.cvar.distance_compute_blas_threshold = 20

INDEX_KINDS = ("flat", "ivf", "hnsw")


def choose_kind(n: int, ivf_threshold: int = 50_000) -> str:
    """Exact flat search while it stays fast; IVF-Flat from the threshold on: at 100k vectors one query
    takes ~0.5 ms at recall@10 1.000 against ~20-70 ms for the flat scan (benchmarks/search_bench.py)."""
    return "flat" if n < ivf_threshold else "ivf"


class VectorIndex:
    """Inner-product search over L2-normalised float32 vectors keyed by int64 ids."""

    def __init__(self, dim: int, kind: str = "flat", nlist: int | None = None, nprobe: int = 32,
                 hnsw_m: int = 32, ef_search: int = 128):
        if kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {kind!r}; choose one of {INDEX_KINDS}")
        self.dim, self.kind, self.nlist, self.nprobe = dim, kind, nlist, nprobe
        self.hnsw_m, self.ef_search = hnsw_m, ef_search
        self.index: faiss.Index | None = None
        self.tombstones: set[int] = set()
        if kind == "flat":
            self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        elif kind == "hnsw":
            hnsw = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = 40
            self.index = faiss.IndexIDMap2(hnsw)

    # ----------------------------------------------------------------- building
    def train(self, vectors: np.ndarray) -> None:
        """IVF only: k-means cells from a sample of at most 64 vectors per cell; nlist = 4*sqrt(N), at most 2048."""
        if self.kind != "ivf":
            return
        vectors = _as_matrix(vectors, self.dim)
        nlist = self.nlist or max(1, min(int(4 * math.sqrt(len(vectors))), 2048, len(vectors) // 39 or 1))
        self.nlist = nlist
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = vectors
        if len(vectors) > 64 * nlist:
            pick = np.random.default_rng(0).choice(len(vectors), 64 * nlist, replace=False)
            sample = vectors[np.sort(pick)]
        ivf.train(sample)
        ivf.nprobe = min(self.nprobe, nlist)
        self.index = ivf

    @property
    def is_trained(self) -> bool:
        return self.index is not None and self.index.is_trained

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = _as_matrix(vectors, self.dim)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) != len(vectors):
            raise ValueError("ids and vectors differ in length")
        if self.index is None:
            self.train(vectors)
        assert self.index is not None
        if len(ids):
            self.index.add_with_ids(vectors, ids)
            self.tombstones.difference_update(int(i) for i in ids)

    def remove(self, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if self.index is None or not len(ids):
            return
        if self.kind == "hnsw":
            self.tombstones.update(int(i) for i in ids)
        else:
            self.index.remove_ids(ids)

    def __len__(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal) - len(self.tombstones)

    # ----------------------------------------------------------------- searching
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query, best first; missing slots have id -1 and score -inf."""
        queries = _as_matrix(queries, self.dim)
        if self.index is None or len(self) == 0 or k <= 0:
            return (np.full((len(queries), max(k, 0)), -np.inf, np.float32),
                    np.full((len(queries), max(k, 0)), -1, np.int64))
        fetch = min(k + len(self.tombstones), int(self.index.ntotal))
        if self.kind == "hnsw":
            faiss.downcast_index(self.index.index).hnsw.efSearch = max(self.ef_search, fetch)
        scores, ids = self.index.search(queries, fetch)
        if self.tombstones:
            dead = np.isin(ids, np.fromiter(self.tombstones, np.int64))
            scores = np.where(dead, -np.inf, scores)
            ids = np.where(dead, -1, ids)
            order = np.argsort(-scores, axis=1, kind="stable")
            scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
        scores, ids = scores[:, :k], ids[:, :k]
        ids = np.where(ids < 0, -1, ids)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        if scores.shape[1] < k:
            pad = k - scores.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        return scores, ids

    # ----------------------------------------------------------------- persistence
    def save(self, path: Path) -> None:
        """Write atomically: a temporary file in the same folder, fsync, then rename over the old one."""
        if self.index is None:
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            faiss.write_index(self.index, tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: Path, kind: str, dim: int, tombstones: set[int] | None = None) -> VectorIndex:
        index = cls(dim, kind)
        index.index = faiss.read_index(str(path))
        if kind == "ivf":
            faiss.downcast_index(index.index).nprobe = index.nprobe
        index.tombstones = set(tombstones or ())
        return index


def _as_matrix(vectors: np.ndarray, dim: int) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ValueError(f"expected vectors of dimension {dim}, got shape {vectors.shape}")
    return vectors
