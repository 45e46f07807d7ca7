"""The Redis transport for Celery messages, with one publishing client per channel.

kombu's Redis channel builds a new ``redis.Redis`` client for every message it
publishes (``Channel.conn_or_acquire`` -> ``_create_client``), and redis-py fills
a table of ~165 response callbacks for each new client: ~0.5 ms of CPU per
wake-up, on the job POST's path.  This channel builds that client once and
reuses it; it shares the channel's connection pool, as the throw-away ones did,
so behaviour is otherwise kombu's own.  Selected with Celery's
``broker_transport = "shared.broker:Transport"`` beside a ``redis://`` URL.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    @cached_property
    def _publishing_client(self) -> Any:
        return self._create_client()  # type: ignore[attr-defined]  # not in celery-types' stubs

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        yield client or self._publishing_client


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT = f"{__name__}:Transport"
