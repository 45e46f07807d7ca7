"""The history listener: turns outbox rows into order_histories (ARCHITECTURE rule 4)."""

from __future__ import annotations

import logging

import redis

from shared.domain.history import record_histories_from_outbox
from shared.jobs import wake_key
from shared.partitions import HISTORY_QUEUE
from workers.base import Runtime

HISTORY_BATCH = 500

log = logging.getLogger(__name__)


def drain_outbox(rt: Runtime) -> int:
    """Deliver every undelivered outbox row; returns how many."""
    try:
        # Cleared before reading, as for a partition (workers.base.drain_partition).
        rt.coordination.delete(wake_key(HISTORY_QUEUE))
    except redis.RedisError as exc:
        log.warning("could not clear the history wake flag: %s", exc)
    delivered = 0
    while True:
        with rt.session_factory() as session, session.begin():
            count = record_histories_from_outbox(session, HISTORY_BATCH)
        delivered += count
        if count < HISTORY_BATCH:
            return delivered
