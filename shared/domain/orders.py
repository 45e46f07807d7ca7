"""Orders: a strict state machine, stock back exactly once (placing orders: ``inventory``)."""

from __future__ import annotations

import enum

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared.domain.errors import NotFound, OrderStateConflict
from shared.domain.products import return_stock
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


def get_order(session: Session, order_id: int) -> tuple[Order, list[OrderLine]]:
    """Raises ``NotFound``."""
    order = session.get(Order, order_id, populate_existing=True)
    if order is None:
        raise NotFound(f"order {order_id} does not exist")
    lines = session.execute(
        select(OrderLine).where(OrderLine.order_id == order_id).order_by(OrderLine.product_id)
    ).scalars()
    return order, list(lines)


def change_order_status(
    session: Session, order_id: int, new_status: OrderStatus, *, expected_version: int | None
) -> tuple[Order, list[int]]:
    """Move the order to ``new_status`` under an optimistic lock on ``version``.

    The UPDATE matches only the version that was read (or ``expected_version``),
    so of two concurrent changes exactly one wins.  Moving to FAILED returns every
    line's stock in the same transaction; FAILED is final, so that happens once.
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
    moved = session.execute(
        update(Order)
        .where(Order.id == order_id, Order.version == order.version)
        .values(status=new_status.value, version=Order.version + 1, updated_at=func.now())
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
    session.add(Outbox(order_id=order_id, status=new_status.value))
    session.flush()
    session.refresh(order)
    return order, restocked


def list_order_histories(session: Session, order_id: int) -> list[OrderHistory]:
    """The states the order entered, in order.  Raises ``NotFound`` for an unknown order."""
    if session.get(Order, order_id) is None:
        raise NotFound(f"order {order_id} does not exist")
    return list(
        session.execute(
            select(OrderHistory)
            .where(OrderHistory.order_id == order_id)
            .order_by(OrderHistory.created_at, OrderHistory.id)
        ).scalars()
    )
