"""Order history, fed from the outbox (ARCHITECTURE rule 4)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from shared.models import OrderHistory, Outbox


def record_histories_from_outbox(session: Session, limit: int) -> int:
    """Turn up to ``limit`` undelivered outbox rows into ``order_histories``, oldest first.

    Idempotent: ``uq_order_histories_order_id_status`` makes a second delivery a
    no-op, and ``FOR UPDATE SKIP LOCKED`` lets two listeners share the outbox.
    Returns how many outbox rows were delivered.
    """
    rows = list(
        session.execute(
            select(Outbox)
            .where(Outbox.delivered_at.is_(None))
            .order_by(Outbox.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).scalars()
    )
    if not rows:
        return 0
    session.execute(
        insert(OrderHistory)
        .values(
            [{"order_id": r.order_id, "status": r.status, "created_at": r.created_at} for r in rows]
        )
        .on_conflict_do_nothing(constraint="uq_order_histories_order_id_status")
    )
    session.execute(
        update(Outbox)
        .where(Outbox.id.in_([r.id for r in rows]))
        .values(delivered_at=func.now())
        .execution_options(synchronize_session=False)
    )
    return len(rows)


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
