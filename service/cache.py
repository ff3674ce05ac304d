"""Shared cache of embeddings keyed by model version and content hash: Redis when configured and reachable,
otherwise (or when Redis fails) an in-process LRU. Per-key rate limits use the same backend."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict

import numpy as np

log = logging.getLogger(__name__)


def content_key(method: str, version: str, kind: str, payload: bytes) -> str:
    return f"vls:{kind}:{method}:{version}:{hashlib.sha256(payload).hexdigest()}"


class EmbeddingCache:
    def __init__(self, redis_url: str | None = None, max_items: int = 10_000, ttl_s: int = 7 * 24 * 3600):
        self.max_items, self.ttl_s = max_items, ttl_s
        self._local: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._redis = None
        self.backend = "memory"
        self.hits = self.misses = 0
        self._rate: dict[str, tuple[int, int]] = {}
        if redis_url:
            try:
                import redis

                client = redis.Redis.from_url(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
                client.ping()
                self._redis, self.backend = client, "redis"
            except Exception as exc:  # noqa: BLE001 - the service runs without Redis
                log.warning("Redis at %s not usable (%s); using the in-process cache", redis_url, exc)

    def get(self, key: str) -> np.ndarray | None:
        data = None
        if self._redis is not None:
            try:
                data = self._redis.get(key)
            except Exception:  # noqa: BLE001
                data = None
        if data is None:
            with self._lock:
                data = self._local.get(key)
                if data is not None:
                    self._local.move_to_end(key)
        if data is None:
            self.misses += 1
            return None
        self.hits += 1
        return np.frombuffer(data, dtype=np.float32).copy()

    def set(self, key: str, vector: np.ndarray) -> None:
        data = np.ascontiguousarray(vector, dtype=np.float32).tobytes()
        if self._redis is not None:
            try:
                self._redis.set(key, data, ex=self.ttl_s)
                return
            except Exception:  # noqa: BLE001
                pass
        if self.max_items <= 0:
            return
        with self._lock:
            self._local[key] = data
            self._local.move_to_end(key)
            while len(self._local) > self.max_items:
                self._local.popitem(last=False)

    def allow(self, api_key: str, per_minute: int) -> bool:
        """Fixed-window rate limit per key; True when the request may proceed."""
        if per_minute <= 0:
            return True
        window = int(time.time() // 60)
        if self._redis is not None:
            try:
                name = f"vls:rate:{api_key}:{window}"
                count = self._redis.incr(name)
                if count == 1:
                    self._redis.expire(name, 120)
                return int(count) <= per_minute
            except Exception:  # noqa: BLE001
                pass
        with self._lock:
            seen_window, count = self._rate.get(api_key, (window, 0))
            count = count + 1 if seen_window == window else 1
            self._rate[api_key] = (window, count)
            return count <= per_minute
