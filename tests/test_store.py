"""The collection store: crash safety (acknowledged items survive without a clean shutdown), snapshots that
are used only when current, and the FAISS index kinds agreeing with exact search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.index import VectorIndex
from service.store import CollectionStore, NewItem


def unit(rng: np.random.Generator, n: int, d: int = 16) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def items(vectors: np.ndarray) -> list[NewItem]:
    return [NewItem(None, "", 0, 0, {"n": n}, f"k{n}", vectors={"irra": v}) for n, v in enumerate(vectors)]


def test_acknowledged_items_survive_a_crash_and_stale_snapshots_are_ignored(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = unit(rng, 30)
    store = CollectionStore(tmp_path, snapshot_every=10)
    store.create("c", ["irra"])
    store.add_items("c", items(vectors[:10]), {"irra": "v1"})
    store.search("c", "irra", vectors[:1], 5)  # builds the in-memory index
    extra = [NewItem(None, "", 0, 0, {"n": 10 + n}, f"x{n}", vectors={"irra": v}) for n, v in enumerate(vectors[10:])]
    store.add_items("c", extra[:12], {"irra": "v1"})  # passes snapshot_every: a snapshot is written
    store.add_items("c", extra[12:], {"irra": "v1"})  # after the snapshot, then "crash": no close()
    del store

    reopened = CollectionStore(tmp_path)
    scores, ids = reopened.search("c", "irra", vectors, 1)
    assert reopened.stats("c")["items"] == 30
    assert np.allclose(scores[:, 0], 1.0, atol=1e-5)  # every vector finds itself, the post-snapshot ones too
    assert len(set(ids[:, 0].tolist())) == 30
    reopened.close()


def test_snapshot_reused_when_current(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    store = CollectionStore(tmp_path)
    store.create("c", ["irra"])
    store.add_items("c", items(unit(rng, 8)), {"irra": "v1"})
    store.search("c", "irra", unit(rng, 1), 3)
    store.close()
    snapshot = tmp_path / "indexes" / "c" / "irra.faiss"
    assert snapshot.exists()
    reopened = CollectionStore(tmp_path)
    index = reopened._load_snapshot(reopened.get("c"), "irra")
    assert index is not None and len(index) == 8
    reopened.close()


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_index_kinds_match_exact_search_and_delete(kind: str) -> None:
    rng = np.random.default_rng(2)
    centres = unit(rng, 20, 32)
    data = centres[rng.integers(0, 20, 2000)] + 0.05 * rng.standard_normal((2000, 32)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    ids = np.arange(1000, 3000, dtype=np.int64)
    index = VectorIndex(32, kind, nprobe=16)
    index.add(ids, data)
    queries = data[:50] + 0.01
    exact = np.argsort(-(queries @ data.T), axis=1)[:, :10] + 1000
    scores, found = index.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, found, strict=True)])
    assert recall >= 0.9
    assert np.allclose(scores[:, 0], np.sum(queries * data[found[:, 0] - 1000], axis=1), atol=1e-4)
    index.remove(found[:, 0])
    _, again = index.search(queries, 10)
    assert not set(found[:, 0].tolist()) & set(again.ravel().tolist())
    assert len(index) == 2000 - len(set(found[:, 0].tolist()))
