"""Redis cache-aside for product reads (ARCHITECTURE rule 5).

The cache is an optimisation: every call swallows Redis errors and the caller
falls back to PostgreSQL.  Writers (workers after commit) store the fresh
product; a reader's fill never overwrites a newer version, so a read that began
before a commit cannot put the old stock back after it.  Before committing, a
writer marks the entry pending at the version it is about to commit: readers
then go to PostgreSQL (and cannot fill an older version) until the refresh after
commit, so no read after a job SUCCEEDED is served the old stock.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, cast

import redis

log = logging.getLogger(__name__)

LISTING_GENERATION_KEY = "products:generation"

# SET only when the stored version is older (or absent), or is a pending marker of
# this same version (the committed document replaces it): ARGV = value, version, ttl.
_SET_IF_NEWER = """
local current = redis.call('GET', KEYS[1])
if current then
  local entry = cjson.decode(current)
  local stored = tonumber(entry['v'])
  local wanted = tonumber(ARGV[2])
  if stored and (stored > wanted or (stored == wanted and not entry['pending'])) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
return 1
"""

# After a failure, leave Redis alone this long so a dead cache costs no timeouts.
_BACKOFF_SECONDS = 2.0


def product_key(product_id: int) -> str:
    return f"product:{product_id}"


class ProductCache:
    def __init__(self, client: redis.Redis, ttl_seconds: int) -> None:
        self._client = client
        self._ttl = ttl_seconds
        self._set_if_newer = client.register_script(_SET_IF_NEWER)
        self._down_until = 0.0
        self._lock = threading.Lock()
        # Writes that did not reach Redis: those entries and the listings may be stale.
        self._dirty: set[int] = set()
        self._listings_dirty = False

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, exc: Exception) -> None:
        with self._lock:
            self._down_until = time.monotonic() + _BACKOFF_SECONDS
        log.warning("product cache unavailable: %s", exc)

    def get_product(self, product_id: int) -> dict[str, Any] | None:
        if not self._available():
            return None
        try:
            raw = cast("bytes | None", self._client.get(product_key(product_id)))
        except redis.RedisError as exc:
            self._failed(exc)
            return None
        if raw is None:
            return None
        entry = json.loads(raw)
        if entry.get("pending"):
            return None  # a change of this product is committing: read PostgreSQL
        doc: dict[str, Any] = entry["doc"]
        return doc

    def put_product(self, doc: dict[str, Any], version: int) -> None:
        """A reader's fill after a miss (refused if a newer version is stored)."""
        if not self._available():
            return
        value = json.dumps({"v": version, "doc": doc}, separators=(",", ":"))
        try:
            self._set_if_newer(keys=[product_key(int(doc["id"]))], args=[value, version, self._ttl])
        except redis.RedisError as exc:
            self._failed(exc)

    def refresh_product(self, doc: dict[str, Any], version: int) -> None:
        """A writer's store after the commit that made ``version``."""
        value = json.dumps({"v": version, "doc": doc}, separators=(",", ":"))
        self._write(int(doc["id"]), value, version)

    def mark_pending(self, product_id: int, version: int) -> None:
        """Before a commit that brings the product to ``version``: make readers miss until
        the document of that version is stored (fills of older versions are refused)."""
        value = json.dumps({"v": version, "pending": True}, separators=(",", ":"))
        self._write(product_id, value, version)

    def _write(self, product_id: int, value: str, version: int) -> None:
        """A writer's change.  If it cannot be made, the entry may now be stale: it is
        remembered and deleted at the next write that reaches Redis."""
        if self._available():
            try:
                self._repair()
                self._set_if_newer(keys=[product_key(product_id)], args=[value, version, self._ttl])
            except redis.RedisError as exc:
                self._failed(exc)
            else:
                return
        with self._lock:
            self._dirty.add(product_id)

    def _repair(self) -> None:
        with self._lock:
            dirty, listings = set(self._dirty), self._listings_dirty
        if not dirty and not listings:
            return
        if dirty:
            self._client.delete(*[product_key(i) for i in dirty])
        self._client.incr(LISTING_GENERATION_KEY)
        with self._lock:
            self._dirty -= dirty
            self._listings_dirty = False
        log.info("product cache repaired: %d entries dropped", len(dirty))

    def listing_generation(self) -> int | None:
        if not self._available():
            return None
        try:
            raw = cast("bytes | None", self._client.get(LISTING_GENERATION_KEY))
        except redis.RedisError as exc:
            self._failed(exc)
            return None
        return int(raw or 0)

    def get_listing(self, generation: int, query_key: str) -> dict[str, Any] | None:
        try:
            raw = cast("bytes | None", self._client.get(f"products:list:{generation}:{query_key}"))
        except redis.RedisError as exc:
            self._failed(exc)
            return None
        if raw is None:
            return None
        page: dict[str, Any] = json.loads(raw)
        return page

    def put_listing(self, generation: int, query_key: str, page: dict[str, Any]) -> None:
        try:
            self._client.set(
                f"products:list:{generation}:{query_key}",
                json.dumps(page, separators=(",", ":")),
                ex=self._ttl,
            )
        except redis.RedisError as exc:
            self._failed(exc)

    def invalidate_listings(self) -> None:
        """Every cached listing page becomes unreachable (their keys embed the generation)."""
        try:
            self._repair()
            self._client.incr(LISTING_GENERATION_KEY)
        except redis.RedisError as exc:
            self._failed(exc)
            with self._lock:
                self._listings_dirty = True


def make_redis(url: str, *, timeout: float | None = 1.0) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        health_check_interval=30,
    )
