"""Redis cache of the best-seller ranking (``GET /v1/products/top``).

One entry per ``days`` holds the top ``MAX_TOP`` products and when they were
computed (``generatedAt``); a request for a smaller ``limit`` is a prefix of it.
Entries live ``TOP_SELLERS_CACHE_SECONDS`` (at most 60, API.md's bound on
``generatedAt``), after which the next request recomputes from the aggregate.
The cache is an optimisation: Redis errors are swallowed and the ranking is
computed from PostgreSQL.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, cast

import redis

from shared.metrics import count_cache_lookup

log = logging.getLogger(__name__)

# The largest ``limit`` the endpoint takes: what one entry holds.
MAX_TOP = 100

# After a failure, leave Redis alone this long so a dead cache costs no timeouts.
_BACKOFF_SECONDS = 2.0


def top_sellers_key(days: int) -> str:
    return f"top-sellers:{days}"


class TopSellersCache:
    def __init__(self, client: redis.Redis, ttl_seconds: int) -> None:
        self._client = client
        self._ttl = ttl_seconds
        self._down_until = 0.0

    def get(self, days: int) -> dict[str, Any] | None:
        """The cached ranking of ``days`` (the answer's document, top ``MAX_TOP``), or None:
        counted."""
        ranking = self._read(days)
        count_cache_lookup("top_sellers", hit=ranking is not None)
        return ranking

    def _read(self, days: int) -> dict[str, Any] | None:
        if time.monotonic() < self._down_until:
            return None
        try:
            raw = cast("bytes | None", self._client.get(top_sellers_key(days)))
        except redis.RedisError as exc:
            self._failed(exc)
            return None
        if raw is None:
            return None
        ranking: dict[str, Any] = json.loads(raw)
        return ranking

    def put(self, days: int, ranking: dict[str, Any]) -> None:
        if time.monotonic() < self._down_until:
            return
        try:
            self._client.set(
                top_sellers_key(days), json.dumps(ranking, separators=(",", ":")), ex=self._ttl
            )
        except redis.RedisError as exc:
            self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        self._down_until = time.monotonic() + _BACKOFF_SECONDS
        log.warning("top-sellers cache unavailable: %s", exc)
