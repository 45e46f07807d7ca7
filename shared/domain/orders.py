"""Orders: a strict state machine, stock back exactly once (placing orders: ``inventory``,
paying them: ``payments``)."""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import Select, func, select, update
from sqlalchemy.orm import Session

from shared.domain.errors import NotFound, OrderStateConflict
from shared.domain.products import return_stock
from shared.domain.sales import uncount_sales
from shared.models import Order, OrderHistory, OrderLine, Outbox


class OrderStatus(enum.StrEnum):
    READY = "READY"
    PAYMENT_READY = "PAYMENT_READY"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


ALLOWED_MOVES: dict[OrderStatus, frozenset[OrderStatus]] = {
    OrderStatus.READY: frozenset({OrderStatus.PAYMENT_READY, OrderStatus.FAILED}),
    OrderStatus.PAYMENT_READY: frozenset({OrderStatus.COMPLETED, OrderStatus.FAILED}),
    OrderStatus.COMPLETED: frozenset(),
    OrderStatus.FAILED: frozenset(),
}
# States in which an order can still be paid, and expires if it is not.
PAYABLE = frozenset({OrderStatus.READY, OrderStatus.PAYMENT_READY})
FINAL = frozenset({OrderStatus.COMPLETED, OrderStatus.FAILED})

# ORDER_PAYMENT_TIMEOUT_SECONDS' default (shared.config): how long an order waits for payment.
DEFAULT_PAYMENT_TIMEOUT = dt.timedelta(seconds=900)


def get_order(session: Session, order_id: int) -> tuple[Order, list[OrderLine]]:
    """The order and its lines (by product id), in one query.  Raises ``NotFound``."""
    rows = session.execute(
        select(Order, OrderLine)
        .outerjoin(OrderLine, OrderLine.order_id == Order.id)
        .where(Order.id == order_id)
        .order_by(OrderLine.product_id)
        .execution_options(populate_existing=True)
    ).all()
    if not rows:
        raise NotFound(f"order {order_id} does not exist")
    return rows[0][0], [line for _, line in rows if line is not None]


def order_owner(session: Session, order_id: int) -> int | None:
    """The user an order belongs to (None: no such order), for reads limited to it."""
    owner: int | None = session.execute(
        select(Order.user_id).where(Order.id == order_id)
    ).scalar_one_or_none()
    return owner


def change_order_status(
    session: Session, order_id: int, new_status: OrderStatus, *, expected_version: int | None
) -> tuple[Order, list[int]]:
    """Move the order to ``new_status`` under an optimistic lock on ``version``.

    One conditional UPDATE checks the state and version that were read (or
    ``expected_version``) and changes them, so of two concurrent changes (this one,
    a payment, the expiry) exactly one wins; nothing is written before it matched.
    Moving to FAILED returns every line's stock (ascending product id) and takes its
    units out of the best-seller aggregate in the same transaction; FAILED is final,
    so that happens once.  A final state clears ``expires_at``.
    Returns the order and the products whose stock changed.
    Raises ``NotFound``, ``OrderStateConflict``.
    """
    order = session.get(Order, order_id, populate_existing=True)
    if order is None:
        raise NotFound(f"order {order_id} does not exist")
    current = OrderStatus(order.status)
    if expected_version is not None and expected_version != order.version:
        raise OrderStateConflict(
            f"order {order_id} is at version {order.version}, not {expected_version}"
        )
    if new_status not in ALLOWED_MOVES[current]:
        raise OrderStateConflict(f"order {order_id} cannot move from {current} to {new_status}")
    changes: dict[str, object] = {"status": new_status.value, "updated_at": func.now()}
    if new_status in FINAL:
        changes["expires_at"] = None
    moved = session.execute(
        update(Order)
        .where(Order.id == order_id, Order.version == order.version, Order.status == current.value)
        .values(version=Order.version + 1, **changes)
        .returning(Order.id)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if moved is None:
        raise OrderStateConflict(f"order {order_id} was changed concurrently")
    restocked: list[int] = []
    if new_status is OrderStatus.FAILED:
        lines = session.execute(
            select(OrderLine).where(OrderLine.order_id == order_id).order_by(OrderLine.product_id)
        ).scalars()
        for line in lines:
            return_stock(session, line.product_id, line.quantity)
            restocked.append(line.product_id)
        uncount_sales(session, order_id)
    session.add(Outbox(order_id=order_id, status=new_status.value))
    session.flush()
    session.refresh(order)
    return order, restocked


def list_expired_orders(session: Session, limit: int) -> list[tuple[int, int]]:
    """Unpaid orders past their ``expiresAt``, soonest first, as (id, version).

    A range scan of ``ix_orders_expires_at``, which holds only unpaid orders."""
    return [
        (row.id, row.version)
        for row in session.execute(
            select(Order.id, Order.version)
            .where(Order.expires_at.is_not(None), Order.expires_at <= func.now())
            .order_by(Order.expires_at)
            .limit(limit)
        )
    ]


def expire_order(session: Session, order_id: int, version: int) -> list[int] | None:
    """Fail an order that expired unpaid at ``version``, by the admin FAILED path (stock
    back once, history through the outbox); returns the restocked products.

    ``None`` when the order moved on since it was listed (a payment, an admin change
    or another expiry won its conditional UPDATE): then nothing was written.
    """
    try:
        _, restocked = change_order_status(
            session, order_id, OrderStatus.FAILED, expected_version=version
        )
    except (NotFound, OrderStateConflict):
        return None
    return restocked


# A state is entered by a transaction that sees the order and sets its updated_at, so
# its created_at (that transaction's start) lies between the order's created_at and
# updated_at, give or take the length of a transaction (one may start before another
# commits); a day of margin each way lets the reads skip every other month.
HISTORY_MARGIN = dt.timedelta(days=1)


def order_histories_query(order_id: int) -> Select[int, OrderHistory]:
    """The order's id (no row: no such order) with each history row (NULL: none yet).

    ``order_histories`` is partitioned by month of ``created_at``; the bounds taken from
    the order's own ``created_at`` and ``updated_at`` (an InitPlan, known when the scan
    starts) leave the partitions of the other months unscanned."""
    known = (
        select(Order.id, Order.created_at, Order.updated_at)
        .where(Order.id == order_id)
        .cte("known")
    )
    since = select(known.c.created_at - HISTORY_MARGIN).scalar_subquery()
    until = select(known.c.updated_at + HISTORY_MARGIN).scalar_subquery()
    return (
        select(known.c.id, OrderHistory)
        .select_from(known)
        .outerjoin(
            OrderHistory,
            (OrderHistory.order_id == order_id)
            & (OrderHistory.created_at >= since)
            & (OrderHistory.created_at <= until),
        )
        .order_by(OrderHistory.created_at, OrderHistory.id)
    )


def list_order_histories(session: Session, order_id: int) -> list[OrderHistory]:
    """The states the order entered, in order, in one query (``order_histories_query``).
    Raises ``NotFound`` for an unknown order."""
    rows = session.execute(order_histories_query(order_id)).all()
    if not rows:
        raise NotFound(f"order {order_id} does not exist")
    return [history for _, history in rows if history is not None]
