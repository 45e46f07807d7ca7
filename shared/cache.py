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

import dataclasses
import json
import logging
import re
import socket
import threading
import time
from typing import Any, cast

import redis

from shared.config import Settings
from shared.metrics import count_cache_lookup

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

# A committed entry as this module writes it: the document's JSON is its "doc" value,
# taken out as bytes (no decoding, no encoding again on the hot path).
_COMMITTED = re.compile(rb'^\{"v":[0-9]+,"doc":(\{.*\})\}$', re.DOTALL)

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
        """The cached document, or None (absent, being refreshed, Redis away): counted."""
        doc = self._read_product(product_id)
        count_cache_lookup("product", hit=doc is not None)
        return doc

    def _fetch_product(self, product_id: int) -> bytes | None:
        """The stored entry's bytes; None when absent, or Redis is away (backing off)."""
        if not self._available():
            return None
        try:
            return cast("bytes | None", self._client.get(product_key(product_id)))
        except redis.RedisError as exc:
            self._failed(exc)
            return None

    def _read_product(self, product_id: int) -> dict[str, Any] | None:
        raw = self._fetch_product(product_id)
        if raw is None:
            return None
        entry = json.loads(raw)
        if entry.get("pending"):
            return None  # a change of this product is committing: read PostgreSQL
        doc: dict[str, Any] = entry["doc"]
        return doc

    def get_product_json(self, product_id: int) -> bytes | None:
        """The cached document as the JSON bytes it was stored as (what ``get_product``
        decodes); ``None`` on a miss, a pending entry or Redis away: counted."""
        doc = self._read_product_json(product_id)
        count_cache_lookup("product", hit=doc is not None)
        return doc

    def _read_product_json(self, product_id: int) -> bytes | None:
        raw = self._fetch_product(product_id)
        if raw is None:
            return None
        committed = _COMMITTED.match(raw)
        if committed is not None:
            return committed.group(1)
        entry = json.loads(raw)  # not written by this module's json.dumps: decode it
        if entry.get("pending"):
            return None
        return json.dumps(entry["doc"], separators=(",", ":")).encode()

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
        self.refresh_products({int(doc["id"]): (doc, version)}, listings=False)

    def refresh_products(
        self, docs: dict[int, tuple[dict[str, Any], int]], *, listings: bool = True
    ) -> None:
        """A writer's stores after a commit (id -> (document, version)), and with
        ``listings`` every cached listing page dropped: one round trip for all."""
        values = {
            pid: (json.dumps({"v": version, "doc": doc}, separators=(",", ":")), version)
            for pid, (doc, version) in docs.items()
        }
        self._write(values, listings=listings)

    def mark_pending(self, product_id: int, version: int) -> None:
        self.mark_products_pending({product_id: version})

    def mark_products_pending(self, versions: dict[int, int]) -> None:
        """Before a commit that brings each product to its version: readers miss until the
        document of that version is stored (fills of older versions are refused)."""
        values = {
            pid: (json.dumps({"v": version, "pending": True}, separators=(",", ":")), version)
            for pid, version in versions.items()
        }
        self._write(values, listings=False)

    def _write(self, values: dict[int, tuple[str, int]], *, listings: bool) -> None:
        """A writer's changes, in one pipeline.  If they cannot be made, the entries (and
        the listings) may now be stale: they are remembered and dropped at the next write
        that reaches Redis."""
        if not values and not listings:
            return
        if self._available():
            try:
                pipe = self._client.pipeline(transaction=False)
                repairing = self._repair(pipe)
                for pid, (value, version) in values.items():
                    self._set_if_newer(
                        keys=[product_key(pid)], args=[value, version, self._ttl], client=pipe
                    )
                if listings:
                    pipe.incr(LISTING_GENERATION_KEY)
                pipe.execute()
            except redis.RedisError as exc:
                self._failed(exc)
            else:
                self._repaired(*repairing)
                return
        with self._lock:
            self._dirty |= set(values)
            self._listings_dirty |= listings

    def _repair(self, pipe: redis.client.Pipeline) -> tuple[set[int], bool]:
        """Queue the drops of entries whose writes were lost (forgotten once executed)."""
        with self._lock:
            dirty, listings = set(self._dirty), self._listings_dirty
        if dirty:
            pipe.delete(*[product_key(i) for i in dirty])
        if dirty or listings:
            pipe.incr(LISTING_GENERATION_KEY)
        return dirty, listings

    def _repaired(self, dirty: set[int], listings: bool) -> None:
        if not dirty and not listings:
            return
        with self._lock:
            self._dirty -= dirty
            if listings:
                self._listings_dirty = False
        log.info("product cache repaired: %d entries dropped", len(dirty))

    def listing_generation(self) -> int | None:
        """The listings' generation, None if Redis is away (a listing miss, counted here:
        the caller then reads PostgreSQL without ``get_listing``)."""
        if not self._available():
            count_cache_lookup("listing", hit=False)
            return None
        try:
            raw = cast("bytes | None", self._client.get(LISTING_GENERATION_KEY))
        except redis.RedisError as exc:
            self._failed(exc)
            count_cache_lookup("listing", hit=False)
            return None
        return int(raw or 0)

    def get_listing(self, generation: int, query_key: str) -> dict[str, Any] | None:
        """A cached listing page, or None: counted."""
        page = self._read_listing(generation, query_key)
        count_cache_lookup("listing", hit=page is not None)
        return page

    def _read_listing(self, generation: int, query_key: str) -> dict[str, Any] | None:
        try:
            raw = cast("bytes | None", self._client.get(f"products:list:{generation}:{query_key}"))
        except redis.RedisError as exc:
            self._failed(exc)
            return None
        if raw is None:
            return None
        page: dict[str, Any] = json.loads(raw)
        return page

    def put_listing(
        self,
        generation: int,
        query_key: str,
        page: dict[str, Any],
        *,
        ttl_seconds: float | None = None,
    ) -> None:
        """Keep a listing page for this generation (``ttl_seconds``: less than the cache's
        lifetime, e.g. for a page read from a replica, good only while its lag allows)."""
        ttl_ms = int((self._ttl if ttl_seconds is None else min(ttl_seconds, self._ttl)) * 1000)
        if ttl_ms <= 0:
            return
        try:
            self._client.set(
                f"products:list:{generation}:{query_key}",
                json.dumps(page, separators=(",", ":")),
                px=ttl_ms,
            )
        except redis.RedisError as exc:
            self._failed(exc)

    def invalidate_listings(self) -> None:
        """Every cached listing page becomes unreachable (their keys embed the generation)."""
        self._write({}, listings=True)


def make_redis(
    url: str, *, timeout: float | None = 1.0, settings: Settings | None = None
) -> redis.Redis:
    """A client whose every wait is bounded: connect and each answer by ``timeout``, and
    a peer behind a blackhole given up by TCP keepalives and ``TCP_USER_TIMEOUT``
    (``settings``' values, else their defaults)."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        health_check_interval=30,
        **redis_keepalive_options(settings),
    )


def redis_keepalive_options(settings: Settings | None = None) -> dict[str, Any]:
    """redis-py's (and kombu's) socket options for TCP keepalives and TCP_USER_TIMEOUT
    (``TCP_KEEPALIVE_*``, ``TCP_USER_TIMEOUT_MS``; the defaults when ``settings`` is None)."""
    idle, interval, count, user_timeout = (
        (
            settings.tcp_keepalive_idle_seconds,
            settings.tcp_keepalive_interval_seconds,
            settings.tcp_keepalive_count,
            settings.tcp_user_timeout_ms,
        )
        if settings is not None
        else _KEEPALIVE_DEFAULTS
    )
    return {
        "socket_keepalive": True,
        "socket_keepalive_options": {
            socket.TCP_KEEPIDLE: idle,
            socket.TCP_KEEPINTVL: interval,
            socket.TCP_KEEPCNT: count,
            socket.TCP_USER_TIMEOUT: user_timeout,
        },
    }


_FIELDS = {f.name: f.default for f in dataclasses.fields(Settings)}
_KEEPALIVE_DEFAULTS = (
    int(cast(int, _FIELDS["tcp_keepalive_idle_seconds"])),
    int(cast(int, _FIELDS["tcp_keepalive_interval_seconds"])),
    int(cast(int, _FIELDS["tcp_keepalive_count"])),
    int(cast(int, _FIELDS["tcp_user_timeout_ms"])),
)
