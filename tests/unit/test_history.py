"""Order history from the outbox: idempotent delivery, the order states were entered."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared.domain.errors import NotFound
from shared.domain.history import has_undelivered_outbox, record_histories_from_outbox
from shared.domain.inventory import LineRequest, create_order
from shared.domain.orders import (
    OrderStatus,
    change_order_status,
    list_order_histories,
)
from shared.domain.products import create_product
from shared.models import OrderHistory, Outbox


@pytest.fixture(autouse=True)
def _only_this_tests_outbox(db_session: Session) -> None:
    """Rows committed by other suites on this database are no concern here (rolled back)."""
    db_session.execute(
        update(Outbox).where(Outbox.delivered_at.is_(None)).values(delivered_at=func.now())
    )


def _order_through(session: Session, *moves: OrderStatus) -> int:
    product = create_product(session, name="P", price=1, stock=10)
    order = create_order(session, 1, [LineRequest(product.id, 1)])
    for move in moves:
        change_order_status(session, order.id, move, expected_version=None)
    return order.id


def _states(session: Session, order_id: int) -> list[str]:
    return [h.status for h in list_order_histories(session, order_id)]


def _history_count(session: Session, order_id: int) -> int:
    return int(
        session.execute(
            select(func.count()).select_from(OrderHistory).where(OrderHistory.order_id == order_id)
        ).scalar_one()
    )


def test_outbox_becomes_history_in_the_order_states_were_entered(db_session: Session) -> None:
    order_id = _order_through(db_session, OrderStatus.PAYMENT_READY, OrderStatus.COMPLETED)
    assert _states(db_session, order_id) == []
    assert record_histories_from_outbox(db_session, 100) == 3
    assert _states(db_session, order_id) == ["READY", "PAYMENT_READY", "COMPLETED"]
    outbox_created = db_session.execute(
        select(Outbox.created_at).where(Outbox.order_id == order_id).order_by(Outbox.id)
    ).scalars()
    assert [h.created_at for h in list_order_histories(db_session, order_id)] == list(
        outbox_created
    )
    assert record_histories_from_outbox(db_session, 100) == 0


def test_delivering_the_same_outbox_twice_leaves_one_row_per_state(db_session: Session) -> None:
    order_id = _order_through(db_session, OrderStatus.FAILED)
    assert record_histories_from_outbox(db_session, 100) == 2
    # A relay re-send after a crash between the insert and the delivery mark.
    db_session.execute(update(Outbox).where(Outbox.order_id == order_id).values(delivered_at=None))
    assert record_histories_from_outbox(db_session, 100) == 2
    assert _history_count(db_session, order_id) == 2
    assert _states(db_session, order_id) == ["READY", "FAILED"]


def test_a_duplicated_outbox_row_gives_one_history_row(db_session: Session) -> None:
    order_id = _order_through(db_session)
    db_session.add(Outbox(order_id=order_id, status=OrderStatus.READY.value))
    db_session.flush()
    assert record_histories_from_outbox(db_session, 100) == 2
    assert _history_count(db_session, order_id) == 1


def test_delivery_goes_oldest_first_within_the_limit(db_session: Session) -> None:
    first = _order_through(db_session, OrderStatus.PAYMENT_READY)
    second = _order_through(db_session)
    assert record_histories_from_outbox(db_session, 2) == 2
    assert _states(db_session, first) == ["READY", "PAYMENT_READY"]
    assert _states(db_session, second) == []
    assert record_histories_from_outbox(db_session, 2) == 1
    assert _states(db_session, second) == ["READY"]


def test_undelivered_outbox_is_seen_only_once_it_has_waited(db_session: Session) -> None:
    order_id = _order_through(db_session)
    assert not has_undelivered_outbox(db_session, dt.timedelta(seconds=1))
    db_session.execute(
        update(Outbox)
        .where(Outbox.order_id == order_id)
        .values(created_at=func.now() - dt.timedelta(minutes=1))
    )
    assert has_undelivered_outbox(db_session, dt.timedelta(seconds=1))
    record_histories_from_outbox(db_session, 100)
    assert not has_undelivered_outbox(db_session, dt.timedelta(seconds=1))


def test_history_of_unknown_order_is_not_found(db_session: Session) -> None:
    with pytest.raises(NotFound):
        list_order_histories(db_session, 2**63 - 1)
