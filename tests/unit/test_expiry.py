"""Unpaid orders expire: listed by a range scan, failed by the admin FAILED path, once."""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from shared.domain.inventory import LineRequest, create_order
from shared.domain.orders import (
    OrderStatus,
    change_order_status,
    expire_order,
    list_expired_orders,
)
from shared.domain.payments import pay
from shared.domain.points import charge_points
from shared.domain.products import create_product, get_product, product_document
from shared.models import Order, Outbox, ProductSales
from shared.partitions import HISTORY_QUEUE
from workers.base import Runtime
from workers.beat import expire_unpaid_orders


def _user() -> int:
    return uuid.uuid4().int % 10**15 + 1


def _order(session: Session, product_id: int, quantity: int = 2, user: int | None = None) -> int:
    session.expire_all()  # lock_products reads through the identity map (a batch's session is new)
    return create_order(session, user or _user(), [LineRequest(product_id, quantity)]).id


def _due(session: Session, order_id: int, seconds_ago: float = 1) -> None:
    """Make the order come due ``seconds_ago`` (the transaction's now() is the test's)."""
    session.execute(
        update(Order)
        .where(Order.id == order_id)
        .values(expires_at=func.now() - dt.timedelta(seconds=seconds_ago))
    )


def _stock(session: Session, product_id: int) -> int:
    session.expire_all()
    return get_product(session, product_id).stock


def _units(session: Session, product_id: int) -> int:
    return int(
        session.execute(
            select(func.coalesce(func.sum(ProductSales.units), 0)).where(
                ProductSales.product_id == product_id
            )
        ).scalar_one()
    )


def test_an_order_expires_at_creation_plus_the_timeout(db_session: Session) -> None:
    product = create_product(db_session, name="W", price=10, stock=10)
    order = create_order(
        db_session, 1, [LineRequest(product.id, 1)], payment_timeout=dt.timedelta(seconds=42)
    )
    db_session.refresh(order)
    assert order.expires_at == order.created_at + dt.timedelta(seconds=42)


def test_only_unpaid_orders_past_their_time_are_listed_soonest_first(db_session: Session) -> None:
    product = create_product(db_session, name="W", price=10, stock=100)
    late, later, future = (_order(db_session, product.id, 1) for _ in range(3))
    _due(db_session, late, seconds_ago=5)
    _due(db_session, later, seconds_ago=1)
    user = _user()
    charge_points(db_session, user, 100)
    paid = _order(db_session, product.id, 1, user=user)
    pay(db_session, user, paid)  # paid: expires_at is NULL, never listed
    ours = {late, later, future, paid}
    listed = [o for o in list_expired_orders(db_session, 10_000) if o[0] in ours]
    assert listed == [(late, 1), (later, 1)]
    assert list_expired_orders(db_session, 0) == []


def test_the_expiry_scan_is_a_range_scan_of_the_partial_index(db_session: Session) -> None:
    db_session.execute(text("SET LOCAL enable_seqscan = off"))  # a small table would be seq-read
    plan = "\n".join(
        db_session.execute(
            text(
                "EXPLAIN SELECT id, version FROM orders WHERE expires_at IS NOT NULL"
                " AND expires_at <= now() ORDER BY expires_at LIMIT 200"
            )
        ).scalars()
    )
    assert "ix_orders_expires_at" in plan, plan
    assert "Index Cond: (expires_at <= now())" in plan, plan


def test_expiry_fails_the_order_returns_the_stock_and_uncounts_it_once(
    db_session: Session,
) -> None:
    product = create_product(db_session, name="W", price=10, stock=10)
    order_id = _order(db_session, product.id, 3)
    assert (_stock(db_session, product.id), _units(db_session, product.id)) == (7, 3)
    _due(db_session, order_id)

    assert expire_order(db_session, order_id, 1) == [product.id]

    db_session.expire_all()
    order = db_session.get_one(Order, order_id)
    assert (order.status, order.version, order.expires_at) == ("FAILED", 2, None)
    assert (_stock(db_session, product.id), _units(db_session, product.id)) == (10, 0)
    states = db_session.execute(
        select(Outbox.status).where(Outbox.order_id == order_id).order_by(Outbox.id)
    ).scalars()
    assert list(states) == ["READY", "FAILED"]
    # Listed again by a slower run, or by two runs at once: the second finds it moved on.
    assert expire_order(db_session, order_id, 1) is None
    assert expire_order(db_session, order_id, 2) is None
    assert (_stock(db_session, product.id), _units(db_session, product.id)) == (10, 0)


def test_a_payment_first_wins_and_the_expiry_changes_nothing(db_session: Session) -> None:
    product = create_product(db_session, name="W", price=10, stock=10)
    user = _user()
    charge_points(db_session, user, 100)
    order_id = _order(db_session, product.id, 2, user=user)
    listed_version = 1
    pay(db_session, user, order_id)

    assert expire_order(db_session, order_id, listed_version) is None

    db_session.expire_all()
    order = db_session.get_one(Order, order_id)
    assert (order.status, order.version) == ("COMPLETED", 2)
    assert _stock(db_session, product.id) == 8


def test_an_admin_change_first_wins_and_the_expiry_changes_nothing(db_session: Session) -> None:
    product = create_product(db_session, name="W", price=10, stock=10)
    order_id = _order(db_session, product.id, 2)
    _due(db_session, order_id)
    change_order_status(db_session, order_id, OrderStatus.PAYMENT_READY, expected_version=1)

    assert expire_order(db_session, order_id, 1) is None  # listed before the admin's change
    assert _stock(db_session, product.id) == 8
    assert expire_order(db_session, order_id, 2) == [product.id]  # next run: still due
    assert _stock(db_session, product.id) == 10


def test_beat_expires_due_orders_refreshes_the_cache_and_wakes_history(
    runtime: Runtime,
) -> None:
    with runtime.session_factory() as session, session.begin():
        product_id = create_product(session, name="W", price=10, stock=10).id
        due, fresh = _order(session, product_id, 4), _order(session, product_id, 1)
        _due(session, due)
    runtime.cache.get_product(product_id)

    assert expire_unpaid_orders(runtime) >= 1

    with runtime.session_factory() as session:
        statuses = dict(
            session.execute(select(Order.id, Order.status).where(Order.id.in_([due, fresh]))).all()
        )
        document = product_document(get_product(session, product_id))
    assert statuses == {due: "FAILED", fresh: "READY"}
    assert document["stock"] == 9
    assert runtime.cache.get_product(product_id) == document
    assert HISTORY_QUEUE in runtime.sent  # type: ignore[attr-defined]

    expire_unpaid_orders(runtime)  # a later run: the order is no longer listed
    with runtime.session_factory() as session:
        assert get_product(session, product_id).stock == 9
        failed = session.execute(
            select(func.count()).where(Outbox.order_id == due, Outbox.status == "FAILED")
        ).scalar_one()
    assert failed == 1
