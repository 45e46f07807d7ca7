"""Order history, fed from the outbox (ARCHITECTURE rule 4)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from shared.models import Outbox

# One statement: mark the oldest undelivered rows delivered and insert their history
# rows (in outbox order), answering how many were delivered.  A state already recorded
# (a redelivery, or a duplicated outbox row) is left out; the trigger on
# order_histories refuses it anyway (pk_order_history_keys), whichever partition
# holds the first row.
# Both look-ups are by key whatever the statistics say: the rows to deliver as an array
# (``id = ANY(ARRAY(..))``, not ``id IN (..)``, which the planner may turn into a hash of
# the whole outbox) and the recorded states as a sub-select per row (not ``NOT EXISTS``,
# which it may turn into a hash of every key): both were sequential scans of tables
# that only grow, once per delivery.
_DELIVER = text(
    """
    WITH delivered AS (
        UPDATE outbox SET delivered_at = now()
        WHERE id = ANY(ARRAY(
            SELECT id FROM outbox WHERE delivered_at IS NULL
            ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED
        ))
        RETURNING id, order_id, status, created_at
    ), fresh AS (
        SELECT DISTINCT ON (d.order_id, d.status) d.id, d.order_id, d.status, d.created_at
        FROM delivered d
        WHERE (
            SELECT true FROM order_history_keys k
            WHERE k.order_id = d.order_id AND k.status = d.status
        ) IS NULL
        ORDER BY d.order_id, d.status, d.id
    ), recorded AS (
        INSERT INTO order_histories (order_id, status, created_at)
        SELECT order_id, status, created_at FROM fresh ORDER BY id
    )
    SELECT count(*) FROM delivered
    """
)


def record_histories_from_outbox(session: Session, limit: int) -> int:
    """Turn up to ``limit`` undelivered outbox rows into ``order_histories``, oldest first.

    Idempotent: a state already in ``order_history_keys`` (one row per order and
    state, across the monthly partitions) is not inserted again, and
    ``FOR UPDATE SKIP LOCKED`` lets two listeners share the outbox.
    Returns how many outbox rows were delivered.
    """
    return int(session.execute(_DELIVER, {"limit": limit}).scalar_one())


def has_undelivered_outbox(session: Session, older_than: dt.timedelta) -> bool:
    """Whether an outbox row has waited longer than ``older_than`` (for the relay)."""
    return (
        session.execute(
            select(Outbox.id)
            .where(Outbox.delivered_at.is_(None), Outbox.created_at < func.now() - older_than)
            .limit(1)
        ).first()
        is not None
    )
