"""Order history, fed from the outbox (ARCHITECTURE rule 4)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from shared.models import Outbox

# One statement: mark the oldest undelivered rows delivered and insert their history
# rows (in outbox order), answering how many were delivered.
_DELIVER = text(
    """
    WITH delivered AS (
        UPDATE outbox SET delivered_at = now()
        WHERE id IN (
            SELECT id FROM outbox WHERE delivered_at IS NULL
            ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED
        )
        RETURNING id, order_id, status, created_at
    ), recorded AS (
        INSERT INTO order_histories (order_id, status, created_at)
        SELECT order_id, status, created_at FROM delivered ORDER BY id
        ON CONFLICT ON CONSTRAINT uq_order_histories_order_id_status DO NOTHING
    )
    SELECT count(*) FROM delivered
    """
)


def record_histories_from_outbox(session: Session, limit: int) -> int:
    """Turn up to ``limit`` undelivered outbox rows into ``order_histories``, oldest first.

    Idempotent: ``uq_order_histories_order_id_status`` makes a second delivery a
    no-op, and ``FOR UPDATE SKIP LOCKED`` lets two listeners share the outbox.
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
