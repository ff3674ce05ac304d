"""Collections: items with metadata and images, their embeddings per method, and FAISS indexes over them.

Durability: SQLite (WAL, ``synchronous=FULL``) is the source of truth - an item is acknowledged only after
the transaction holding its metadata and every embedding has committed, and image files are fsynced before
that. FAISS indexes are in memory and snapshotted to disk (atomically) with the change counter they reflect;
on start a snapshot is used only when its counter equals the catalogue's, otherwise the index is rebuilt
from the stored embeddings. So a crash can cost a rebuild, never an acknowledged item.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.errors import ApiError, not_found
from service.index import VectorIndex, choose_kind

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (
    name TEXT PRIMARY KEY,
    methods TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL DEFAULT 'images',
    created_at REAL NOT NULL,
    change_counter INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    collection TEXT NOT NULL REFERENCES collections(name) ON DELETE CASCADE,
    key TEXT,
    text TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    image_file TEXT,
    image_sha256 TEXT,
    width INTEGER,
    height INTEGER,
    created_at REAL NOT NULL,
    UNIQUE (collection, key)
);
CREATE INDEX IF NOT EXISTS items_by_collection ON items(collection);
CREATE TABLE IF NOT EXISTS embeddings (
    item_id INTEGER NOT NULL REFERENCES items(id) ON DELETE CASCADE,
    method TEXT NOT NULL,
    model_version TEXT NOT NULL,
    vector BLOB NOT NULL,
    state BLOB,
    PRIMARY KEY (item_id, method)
);
"""


@dataclass
class NewItem:
    """An item to add: image bytes (kept for links and re-indexing), metadata, and per-method vectors."""

    image_bytes: bytes | None
    image_format: str
    width: int
    height: int
    metadata: dict[str, Any] = field(default_factory=dict)
    key: str | None = None
    text: str | None = None
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    states: dict[str, bytes] = field(default_factory=dict)


@dataclass
class Collection:
    name: str
    methods: list[str]
    description: str
    kind: str
    created_at: float
    change_counter: int


class CollectionStore:
    """All collections of one data directory."""

    def __init__(self, data_dir: Path, snapshot_every: int = 1000, ivf_threshold: int = 50_000):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.snapshot_every = snapshot_every
        self.ivf_threshold = ivf_threshold
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.data_dir / "catalog.sqlite3", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        self._indexes: dict[tuple[str, str], VectorIndex] = {}
        self._unsaved: dict[tuple[str, str], int] = {}

    # ----------------------------------------------------------------- collections
    def create(self, name: str, methods: Sequence[str], description: str = "", kind: str = "images") -> Collection:
        if not NAME_PATTERN.match(name):
            raise ApiError(422, "invalid_collection_name",
                           "a collection name is 1-64 letters, digits, '_', '-' or '.', starting alphanumeric")
        if kind not in ("images", "texts"):
            raise ApiError(422, "invalid_request", "a collection holds 'images' or 'texts'")
        if not methods:
            raise ApiError(422, "invalid_request", "a collection needs at least one method")
        with self._lock:
            try:
                self._db.execute("INSERT INTO collections(name, methods, description, kind, created_at)"
                                 " VALUES (?,?,?,?,?)",
                                 (name, json.dumps(list(dict.fromkeys(methods))), description, kind, time.time()))
            except sqlite3.IntegrityError as exc:
                raise ApiError(409, "collection_exists", f"collection {name!r} already exists") from exc
        return self.get(name)

    def get(self, name: str) -> Collection:
        row = self._db.execute("SELECT name, methods, description, kind, created_at, change_counter FROM collections"
                               " WHERE name=?", (name,)).fetchone()
        if row is None:
            raise not_found("collection", name)
        return Collection(row[0], json.loads(row[1]), row[2], row[3], row[4], row[5])

    def list(self) -> list[Collection]:
        rows = self._db.execute("SELECT name FROM collections ORDER BY name").fetchall()
        return [self.get(r[0]) for r in rows]

    def add_methods(self, name: str, methods: Sequence[str]) -> Collection:
        """Bind more methods; their embeddings are then filled by ``missing_embeddings`` + ``put_embeddings``."""
        with self._lock:
            collection = self.get(name)
            merged = list(dict.fromkeys([*collection.methods, *methods]))
            self._db.execute("UPDATE collections SET methods=? WHERE name=?", (json.dumps(merged), name))
        return self.get(name)

    def drop(self, name: str) -> None:
        with self._lock:
            self.get(name)
            files = [r[0] for r in self._db.execute("SELECT image_file FROM items WHERE collection=?", (name,))]
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM embeddings WHERE item_id IN (SELECT id FROM items WHERE collection=?)",
                             (name,))
            self._db.execute("DELETE FROM items WHERE collection=?", (name,))
            self._db.execute("DELETE FROM collections WHERE name=?", (name,))
            self._db.execute("COMMIT")
            for key in [k for k in self._indexes if k[0] == name]:
                del self._indexes[key]
            for file in files:
                if file:
                    (self.data_dir / file).unlink(missing_ok=True)
            for snap in (self.data_dir / "indexes" / name).glob("*") if (self.data_dir / "indexes" / name).exists() \
                    else []:
                snap.unlink()

    def stats(self, name: str) -> dict[str, Any]:
        collection = self.get(name)
        count = self._db.execute("SELECT COUNT(*) FROM items WHERE collection=?", (name,)).fetchone()[0]
        per_method = {}
        for method in collection.methods:
            n, versions = self._db.execute(
                "SELECT COUNT(*), GROUP_CONCAT(DISTINCT model_version) FROM embeddings e JOIN items i "
                "ON e.item_id=i.id WHERE i.collection=? AND e.method=?", (name, method)).fetchone()
            index = self._indexes.get((name, method))
            per_method[method] = {"embedded_items": n, "model_versions": (versions or "").split(",") if versions
                                  else [], "index_kind": index.kind if index else None}
        return {"name": name, "kind": collection.kind, "methods": collection.methods,
                "description": collection.description,
                "items": count, "created_at": collection.created_at, "index_version": collection.change_counter,
                "indexes": per_method}

    # ----------------------------------------------------------------- items
    def add_items(self, name: str, items: Sequence[NewItem], model_versions: dict[str, str]) -> list[int]:
        """Store items and their embeddings in one transaction, then update the in-memory indexes."""
        collection = self.get(name)
        for item in items:
            missing = [m for m in collection.methods if m not in item.vectors]
            if missing:
                raise ValueError(f"item lacks embeddings for {missing}")
        keys = [item.key for item in items if item.key is not None]
        if len(keys) != len(set(keys)):
            raise ApiError(409, "duplicate_key", "the request holds the same item key twice")
        with self._lock:
            if keys:
                marks = ",".join("?" * len(keys))
                taken = self._db.execute(f"SELECT key FROM items WHERE collection=? AND key IN ({marks})",
                                         (name, *keys)).fetchall()
                if taken:
                    raise ApiError(409, "duplicate_key", f"item keys already present: {[t[0] for t in taken]}")
            written: list[Path] = []
            try:
                rows = []
                for item in items:
                    rel = None
                    digest = None
                    if item.image_bytes is not None:
                        digest = hashlib.sha256(item.image_bytes).hexdigest()
                        rel = f"images/{name}/{digest[:2]}/{digest}.{item.image_format}"
                        target = self.data_dir / rel
                        if not target.exists():
                            _write_durably(target, item.image_bytes)
                            written.append(target)
                    rows.append((rel, digest))
                self._db.execute("BEGIN IMMEDIATE")
                ids = []
                now = time.time()
                for item, (rel, digest) in zip(items, rows, strict=True):
                    cursor = self._db.execute(
                        "INSERT INTO items(collection, key, text, metadata, image_file, image_sha256, width, height,"
                        " created_at) VALUES (?,?,?,?,?,?,?,?,?)",
                        (name, item.key, item.text, json.dumps(item.metadata), rel, digest, item.width,
                         item.height, now))
                    item_id = int(cursor.lastrowid)
                    ids.append(item_id)
                    for method in collection.methods:
                        vector = np.ascontiguousarray(item.vectors[method], dtype=np.float32)
                        self._db.execute("INSERT INTO embeddings(item_id, method, model_version, vector, state)"
                                         " VALUES (?,?,?,?,?)",
                                         (item_id, method, model_versions[method], vector.tobytes(),
                                          item.states.get(method)))
                self._db.execute("UPDATE collections SET change_counter=change_counter+? WHERE name=?",
                                 (len(items), name))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                for path in written:
                    path.unlink(missing_ok=True)
                raise
            for method in collection.methods:
                index = self._indexes.get((name, method))
                if index is not None:
                    index.add(np.asarray(ids, np.int64), np.stack([it.vectors[method] for it in items]))
                self._changed(name, method, len(items))
            return ids

    def delete_items(self, name: str, item_ids: Iterable[int]) -> int:
        collection = self.get(name)
        item_ids = [int(i) for i in item_ids]
        with self._lock:
            marks = ",".join("?" * len(item_ids))
            present = [r[0] for r in self._db.execute(
                f"SELECT id FROM items WHERE collection=? AND id IN ({marks})", (name, *item_ids))]
            if len(present) != len(set(item_ids)):
                missing = sorted(set(item_ids) - set(present))
                raise ApiError(404, "item_not_found", f"items {missing} are not in collection {name!r}")
            files = self._db.execute(f"SELECT image_file FROM items WHERE id IN ({marks})", item_ids).fetchall()
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(f"DELETE FROM embeddings WHERE item_id IN ({marks})", item_ids)
            self._db.execute(f"DELETE FROM items WHERE id IN ({marks})", item_ids)
            self._db.execute("UPDATE collections SET change_counter=change_counter+? WHERE name=?",
                             (len(item_ids), name))
            self._db.execute("COMMIT")
            for method in collection.methods:
                index = self._indexes.get((name, method))
                if index is not None:
                    index.remove(np.asarray(item_ids, np.int64))
                self._changed(name, method, len(item_ids))
            for (file,) in files:
                if file and not self._db.execute("SELECT 1 FROM items WHERE image_file=? LIMIT 1",
                                                 (file,)).fetchone():
                    (self.data_dir / file).unlink(missing_ok=True)
        return len(item_ids)

    def items(self, name: str, item_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        self.get(name)
        if not item_ids:
            return {}
        marks = ",".join("?" * len(item_ids))
        rows = self._db.execute(
            f"SELECT id, key, text, metadata, image_file, width, height, created_at FROM items WHERE collection=?"
            f" AND id IN ({marks})", (name, *[int(i) for i in item_ids])).fetchall()
        return {r[0]: {"id": r[0], "key": r[1], "text": r[2], "metadata": json.loads(r[3]), "image_file": r[4],
                       "width": r[5], "height": r[6], "created_at": r[7]} for r in rows}

    def list_items(self, name: str, offset: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        self.get(name)
        ids = [r[0] for r in self._db.execute("SELECT id FROM items WHERE collection=? ORDER BY id LIMIT ? OFFSET ?",
                                              (name, limit, offset))]
        found = self.items(name, ids)
        return [found[i] for i in ids]

    def item_by_key(self, name: str, key: str) -> dict[str, Any]:
        row = self._db.execute("SELECT id FROM items WHERE collection=? AND key=?", (name, key)).fetchone()
        if row is None:
            raise not_found("item", key)
        return self.items(name, [row[0]])[row[0]]

    def image_path(self, name: str, item_id: int) -> Path:
        found = self.items(name, [item_id])
        if item_id not in found:
            raise not_found("item", str(item_id))
        if not found[item_id]["image_file"]:
            raise ApiError(404, "image_not_stored", f"item {item_id} has no stored image")
        return self.data_dir / found[item_id]["image_file"]

    def states(self, name: str, method: str, item_ids: Sequence[int]) -> dict[int, bytes]:
        """The per-item method state blobs (e.g. LAPS's text-independent image tensors)."""
        if not item_ids:
            return {}
        marks = ",".join("?" * len(item_ids))
        rows = self._db.execute(f"SELECT item_id, state FROM embeddings WHERE method=? AND item_id IN ({marks})",
                                (method, *[int(i) for i in item_ids])).fetchall()
        return {r[0]: r[1] for r in rows}

    def missing_embeddings(self, name: str, method: str) -> list[int]:
        rows = self._db.execute("SELECT i.id FROM items i LEFT JOIN embeddings e ON e.item_id=i.id AND e.method=? "
                                "WHERE i.collection=? AND e.item_id IS NULL ORDER BY i.id", (method, name))
        return [r[0] for r in rows]

    def put_embeddings(self, name: str, method: str, model_version: str, item_ids: Sequence[int],
                       vectors: np.ndarray, states: Sequence[bytes | None] | None = None) -> None:
        """Add one method's embeddings to existing items (indexing a gallery with a second method)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            for n, (item_id, vector) in enumerate(zip(item_ids, vectors, strict=True)):
                self._db.execute("INSERT OR REPLACE INTO embeddings(item_id, method, model_version, vector, state)"
                                 " VALUES (?,?,?,?,?)", (int(item_id), method, model_version,
                                                         np.ascontiguousarray(vector, np.float32).tobytes(),
                                                         states[n] if states else None))
            self._db.execute("UPDATE collections SET change_counter=change_counter+? WHERE name=?",
                             (len(item_ids), name))
            self._db.execute("COMMIT")
            self._indexes.pop((name, method), None)  # rebuilt on next use from the committed rows

    # ----------------------------------------------------------------- search
    def index(self, name: str, method: str) -> VectorIndex | None:
        """The collection's index for ``method``: in memory, from a current snapshot, or rebuilt."""
        collection = self.get(name)
        if method not in collection.methods:
            raise ApiError(422, "method_not_indexed",
                           f"collection {name!r} is indexed for {collection.methods}, not {method!r}")
        with self._lock:
            key = (name, method)
            if key in self._indexes:
                return self._indexes[key]
            index = self._load_snapshot(collection, method) or self._rebuild(name, method)
            if index is not None:
                self._indexes[key] = index
            return index

    def search(self, name: str, method: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        index = self.index(name, method)
        if index is None:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        return index.search(queries, k)

    def vectors(self, name: str, method: str, item_ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of one method's embeddings, all of them or the given ids."""
        query = ("SELECT e.item_id, e.vector FROM embeddings e JOIN items i ON e.item_id=i.id "
                 "WHERE i.collection=? AND e.method=?")
        params: list[Any] = [name, method]
        if item_ids is not None:
            query += f" AND e.item_id IN ({','.join('?' * len(item_ids))})"
            params += [int(i) for i in item_ids]
        rows = self._db.execute(query + " ORDER BY e.item_id", params).fetchall()
        if not rows:
            return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        vectors = np.stack([np.frombuffer(r[1], np.float32) for r in rows])
        return ids, vectors

    def _rebuild(self, name: str, method: str) -> VectorIndex | None:
        ids, vectors = self.vectors(name, method)
        if not len(ids):
            return None
        index = VectorIndex(vectors.shape[1], choose_kind(len(ids), self.ivf_threshold))
        index.add(ids, vectors)
        return index

    # ----------------------------------------------------------------- snapshots
    def _snapshot_paths(self, name: str, method: str) -> tuple[Path, Path]:
        folder = self.data_dir / "indexes" / name
        return folder / f"{method}.faiss", folder / f"{method}.json"

    def _load_snapshot(self, collection: Collection, method: str) -> VectorIndex | None:
        index_path, meta_path = self._snapshot_paths(collection.name, method)
        if not (index_path.exists() and meta_path.exists()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("change_counter") != collection.change_counter:
                return None
            return VectorIndex.load(index_path, meta["kind"], meta["dim"], set(meta.get("tombstones", [])))
        except (OSError, ValueError, KeyError, RuntimeError):
            return None  # a damaged snapshot is only a cache: rebuild from the catalogue

    def snapshot(self, name: str | None = None) -> None:
        """Write current snapshots (all collections when ``name`` is None)."""
        with self._lock:
            for (coll, method), index in list(self._indexes.items()):
                if name is not None and coll != name:
                    continue
                counter = self.get(coll).change_counter
                index_path, meta_path = self._snapshot_paths(coll, method)
                index.save(index_path)
                _write_durably(meta_path, json.dumps({"change_counter": counter, "kind": index.kind,
                                                      "dim": index.dim,
                                                      "tombstones": sorted(index.tombstones)}).encode())
                self._unsaved[(coll, method)] = 0

    def _changed(self, name: str, method: str, n: int) -> None:
        key = (name, method)
        self._unsaved[key] = self._unsaved.get(key, 0) + n
        if key in self._indexes and self._unsaved[key] >= self.snapshot_every:
            self.snapshot(name)

    def close(self) -> None:
        with self._lock:
            self.snapshot()
            self._db.close()


def _write_durably(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
