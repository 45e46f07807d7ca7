"""The history listener: turns outbox rows into order_histories (ARCHITECTURE rule 4)."""

from __future__ import annotations

import logging
import time

from shared.domain.history import record_histories_from_outbox
from shared.partitions import HISTORY_QUEUE
from workers.base import Runtime

HISTORY_BATCH = 500

log = logging.getLogger(__name__)


def drain_outbox(rt: Runtime) -> int:
    """Deliver every undelivered outbox row; returns how many.

    The listener first waits ``HISTORY_LINGER_MS`` with its wake flag still set:
    orders committed meanwhile send no wake-up and join this drain, so a stream of
    orders costs a few drains a second instead of one per batch.  The history
    queue is its own (API.md gives order history 2 s), so the wait holds no
    partition back.  The flag is cleared before reading, as for a partition
    (``workers.base.drain_partition``): rows committed after the read send a
    wake-up of their own.
    """
    if rt.settings.history_linger_ms:
        time.sleep(rt.settings.history_linger_ms / 1000)
    rt.release(HISTORY_QUEUE)
    delivered = 0
    while True:
        with rt.session_factory() as session, session.begin():
            count = record_histories_from_outbox(session, HISTORY_BATCH)
        delivered += count
        if count < HISTORY_BATCH:
            return delivered
