"""The embedding cache and rate limits against a real Redis (scripts/test.sh makes sure one answers),
and the in-process fallback when Redis is not reachable."""

from __future__ import annotations

import os
import uuid

import numpy as np
import redis

from service.cache import EmbeddingCache, content_key

REDIS_URL = os.environ.get("VLS_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def test_redis_cache_is_shared_between_processes_views() -> None:
    first, second = EmbeddingCache(REDIS_URL), EmbeddingCache(REDIS_URL)
    assert first.backend == "redis" == second.backend
    key = content_key("irra", "v1", "text", uuid.uuid4().bytes)
    vector = np.arange(8, dtype=np.float32) / 7
    assert second.get(key) is None
    first.set(key, vector)
    assert np.array_equal(second.get(key), vector)
    assert redis.Redis.from_url(REDIS_URL).ttl(key) > 0
    redis.Redis.from_url(REDIS_URL).delete(key)


def test_rate_limit_counts_per_key_in_redis() -> None:
    cache = EmbeddingCache(REDIS_URL)
    who = f"key-{uuid.uuid4()}"
    assert [cache.allow(who, 3) for _ in range(5)] == [True, True, True, False, False]
    assert cache.allow(f"other-{uuid.uuid4()}", 3)


def test_falls_back_to_memory_without_redis() -> None:
    cache = EmbeddingCache("redis://127.0.0.1:1/0", max_items=2)
    assert cache.backend == "memory"
    for n in range(3):
        cache.set(f"k{n}", np.full(4, n, np.float32))
    assert cache.get("k0") is None and cache.get("k2")[0] == 2  # LRU bound holds
    assert [cache.allow("x", 1) for _ in range(2)] == [True, False]
