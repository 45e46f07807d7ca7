"""The product cache on a real Redis, including one that goes away and comes back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shared import cache as cache_module
from shared.cache import ProductCache, make_redis
from shared.embedded import EmbeddedRedis


def _doc(product_id: int, stock: int) -> dict[str, object]:
    return {
        "id": product_id,
        "name": "p",
        "price": 1,
        "stock": stock,
        "createdAt": "x",
        "updatedAt": "x",
    }


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis", persist=True)
    server.start()
    yield server
    server.stop()


def test_a_reader_fill_never_replaces_a_newer_version(private_redis: EmbeddedRedis) -> None:
    cache = ProductCache(make_redis(private_redis.url), ttl_seconds=60)
    cache.refresh_product(_doc(1, 5), version=2)
    cache.put_product(_doc(1, 9), version=1)  # a read that began before the commit of version 2
    assert cache.get_product(1) == _doc(1, 5)


def test_a_pending_entry_makes_readers_miss_until_refreshed(private_redis: EmbeddedRedis) -> None:
    cache = ProductCache(make_redis(private_redis.url), ttl_seconds=60)
    cache.refresh_product(_doc(1, 5), version=1)
    cache.mark_pending(1, version=2)
    assert cache.get_product(1) is None
    cache.put_product(_doc(1, 5), version=1)  # an old fill cannot replace the marker
    assert cache.get_product(1) is None
    cache.refresh_product(_doc(1, 4), version=2)
    assert cache.get_product(1) == _doc(1, 4)


def test_a_write_lost_while_redis_was_down_is_repaired_when_it_returns(
    private_redis: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache_module, "_BACKOFF_SECONDS", 0.0)
    cache = ProductCache(make_redis(private_redis.url, timeout=0.5), ttl_seconds=60)
    cache.refresh_product(_doc(1, 5), version=1)
    private_redis.stop()
    cache.mark_pending(1, version=2)  # lost: Redis is down
    cache.refresh_product(_doc(1, 4), version=2)  # lost too
    private_redis.start()  # same port, the append-only file brings version 1 back
    assert cache.get_product(1) == _doc(1, 5)  # stale, as Redis kept it
    cache.refresh_product(_doc(2, 7), version=1)  # the next write that reaches Redis repairs
    assert cache.get_product(1) is None
    assert cache.get_product(2) == _doc(2, 7)


def test_reads_answer_none_while_redis_is_down(private_redis: EmbeddedRedis) -> None:
    cache = ProductCache(make_redis(private_redis.url, timeout=0.5), ttl_seconds=60)
    private_redis.stop()
    assert cache.get_product(1) is None
    assert cache.listing_generation() is None
