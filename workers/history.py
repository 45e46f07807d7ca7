"""The history listener: turns outbox rows into order_histories (ARCHITECTURE rule 4)."""

from __future__ import annotations

from shared.domain.history import record_histories_from_outbox
from shared.jobs import wake_key
from shared.partitions import HISTORY_QUEUE
from workers.base import Runtime

HISTORY_BATCH = 500


def drain_outbox(rt: Runtime) -> int:
    """Deliver every undelivered outbox row; returns how many."""
    rt.coordination.delete(wake_key(HISTORY_QUEUE))
    delivered = 0
    while True:
        with rt.session_factory() as session, session.begin():
            count = record_histories_from_outbox(session, HISTORY_BATCH)
        delivered += count
        if count < HISTORY_BATCH:
            return delivered
