"""Order rules on a real database: all or nothing, the state machine, restock once, outbox."""

from __future__ import annotations

import itertools

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared.domain.errors import (
    ErrorCode,
    InsufficientStock,
    NotFound,
    OrderStateConflict,
    ProductNotFound,
)
from shared.domain.inventory import LineRequest, create_order
from shared.domain.orders import (
    OrderStatus,
    change_order_status,
    get_order,
)
from shared.domain.products import create_product, get_product
from shared.models import Order, Outbox, Product

UNKNOWN_ID = 2**63 - 1

# API.md "Order states", written out independently of ALLOWED_MOVES.
ALLOWED = {
    (OrderStatus.READY, OrderStatus.PAYMENT_READY),
    (OrderStatus.PAYMENT_READY, OrderStatus.COMPLETED),
    (OrderStatus.READY, OrderStatus.FAILED),
    (OrderStatus.PAYMENT_READY, OrderStatus.FAILED),
}
# How to reach each state from a new order.
PATH_TO = {
    OrderStatus.READY: [],
    OrderStatus.PAYMENT_READY: [OrderStatus.PAYMENT_READY],
    OrderStatus.COMPLETED: [OrderStatus.PAYMENT_READY, OrderStatus.COMPLETED],
    OrderStatus.FAILED: [OrderStatus.FAILED],
}


def _stock(session: Session, product_id: int) -> int:
    session.expire_all()
    return get_product(session, product_id).stock


def _outbox_states(session: Session, order_id: int) -> list[str]:
    return list(
        session.execute(
            select(Outbox.status).where(Outbox.order_id == order_id).order_by(Outbox.id)
        ).scalars()
    )


def _new_order(session: Session, stock: int = 10, quantity: int = 2) -> tuple[int, int]:
    product = create_product(session, name="Widget", price=250, stock=stock)
    order = create_order(session, 7, [LineRequest(product.id, quantity)])
    return order.id, product.id


def test_order_takes_every_line_and_records_prices_at_order_time(db_session: Session) -> None:
    a = create_product(db_session, name="A", price=1_000, stock=10)
    b = create_product(db_session, name="B", price=250, stock=5)
    c = create_product(db_session, name="C", price=0, stock=1)
    order = create_order(
        db_session, 42, [LineRequest(c.id, 1), LineRequest(a.id, 3), LineRequest(b.id, 5)]
    )
    assert (order.user_id, order.status, order.version) == (42, "READY", 1)
    assert order.total_price == 3 * 1_000 + 5 * 250 + 0
    assert (_stock(db_session, a.id), _stock(db_session, b.id), _stock(db_session, c.id)) == (
        7,
        0,
        0,
    )
    # A later price change does not touch the order.
    db_session.execute(update(Product).where(Product.id == a.id).values(price=9_999))
    stored, lines = get_order(db_session, order.id)
    assert stored.total_price == 4_250
    assert [(line.product_id, line.quantity, line.unit_price) for line in lines] == sorted(
        [(a.id, 3, 1_000), (b.id, 5, 250), (c.id, 1, 0)]
    )
    assert _outbox_states(db_session, order.id) == ["READY"]


def test_one_short_line_takes_nothing_from_the_others(db_session: Session) -> None:
    a = create_product(db_session, name="A", price=1, stock=10)
    b = create_product(db_session, name="B", price=1, stock=1)
    c = create_product(db_session, name="C", price=1, stock=10)
    orders_before = db_session.execute(select(Order.id)).scalars().all()
    with pytest.raises(InsufficientStock) as caught, db_session.begin_nested():
        create_order(
            db_session, 1, [LineRequest(a.id, 4), LineRequest(b.id, 2), LineRequest(c.id, 4)]
        )
    assert caught.value.code is ErrorCode.INSUFFICIENT_STOCK
    assert [_stock(db_session, p.id) for p in (a, b, c)] == [10, 1, 10]
    assert db_session.execute(select(Order.id)).scalars().all() == orders_before


@pytest.mark.parametrize("missing_first", [True, False])
def test_product_not_found_beats_insufficient_stock(
    db_session: Session, missing_first: bool
) -> None:
    short = create_product(db_session, name="short", price=1, stock=1)
    # The missing id sorts before or after the short line: either way it wins
    # (identity columns start at 1, so no product ever has id 0).
    missing = 0 if missing_first else UNKNOWN_ID
    with pytest.raises(ProductNotFound) as caught, db_session.begin_nested():
        create_order(db_session, 1, [LineRequest(short.id, 5), LineRequest(missing, 1)])
    assert caught.value.code is ErrorCode.PRODUCT_NOT_FOUND
    assert _stock(db_session, short.id) == 1


def test_an_exact_stock_order_empties_the_product(db_session: Session) -> None:
    order_id, product_id = _new_order(db_session, stock=2, quantity=2)
    assert _stock(db_session, product_id) == 0
    with pytest.raises(InsufficientStock), db_session.begin_nested():
        create_order(db_session, 1, [LineRequest(product_id, 1)])
    assert get_order(db_session, order_id)[0].status == "READY"


def test_get_unknown_order_is_not_found(db_session: Session) -> None:
    with pytest.raises(NotFound):
        get_order(db_session, UNKNOWN_ID)
    with pytest.raises(NotFound):
        change_order_status(db_session, UNKNOWN_ID, OrderStatus.FAILED, expected_version=None)


@pytest.mark.parametrize(
    ("start", "target"), list(itertools.product(OrderStatus, OrderStatus)), ids=str
)
def test_state_machine(db_session: Session, start: OrderStatus, target: OrderStatus) -> None:
    order_id, product_id = _new_order(db_session)
    for step in PATH_TO[start]:
        change_order_status(db_session, order_id, step, expected_version=None)
    before, _ = get_order(db_session, order_id)
    version, stock = before.version, _stock(db_session, product_id)
    assert (before.status, version) == (start.value, 1 + len(PATH_TO[start]))
    if (start, target) in ALLOWED:
        order, _ = change_order_status(db_session, order_id, target, expected_version=version)
        assert (order.status, order.version) == (target.value, version + 1)
        assert _outbox_states(db_session, order_id)[-1] == target.value
    else:
        outbox = _outbox_states(db_session, order_id)
        with pytest.raises(OrderStateConflict) as caught, db_session.begin_nested():
            change_order_status(db_session, order_id, target, expected_version=None)
        assert caught.value.code is ErrorCode.ORDER_STATE_CONFLICT
        after, _ = get_order(db_session, order_id)
        assert (after.status, after.version) == (start.value, version)
        assert _outbox_states(db_session, order_id) == outbox
        assert _stock(db_session, product_id) == stock


def test_stale_expected_version_is_a_conflict(db_session: Session) -> None:
    order_id, _ = _new_order(db_session)
    change_order_status(db_session, order_id, OrderStatus.PAYMENT_READY, expected_version=1)
    with pytest.raises(OrderStateConflict), db_session.begin_nested():
        change_order_status(db_session, order_id, OrderStatus.COMPLETED, expected_version=1)
    with pytest.raises(OrderStateConflict), db_session.begin_nested():
        change_order_status(db_session, order_id, OrderStatus.COMPLETED, expected_version=3)
    order, _ = get_order(db_session, order_id)
    assert (order.status, order.version) == ("PAYMENT_READY", 2)
    order, _ = change_order_status(db_session, order_id, OrderStatus.COMPLETED, expected_version=2)
    assert (order.status, order.version) == ("COMPLETED", 3)


def test_a_version_changed_behind_the_read_loses(db_session: Session) -> None:
    """The change reads the current row, not the session's stale copy of it."""
    order_id, _ = _new_order(db_session)
    _order, _ = get_order(db_session, order_id)  # now in the identity map at version 1
    # A concurrent writer moves it on (the ORM object is not told).
    db_session.execute(
        update(Order)
        .where(Order.id == order_id)
        .values(status="PAYMENT_READY", version=2)
        .execution_options(synchronize_session=False)
    )
    moved, _ = change_order_status(db_session, order_id, OrderStatus.COMPLETED, expected_version=2)
    assert (moved.status, moved.version) == ("COMPLETED", 3)


@pytest.mark.parametrize("via_payment", [False, True])
def test_failed_restocks_exactly_once(db_session: Session, via_payment: bool) -> None:
    a = create_product(db_session, name="A", price=5, stock=10)
    b = create_product(db_session, name="B", price=7, stock=4)
    order = create_order(db_session, 3, [LineRequest(b.id, 4), LineRequest(a.id, 3)])
    assert (_stock(db_session, a.id), _stock(db_session, b.id)) == (7, 0)
    if via_payment:
        change_order_status(db_session, order.id, OrderStatus.PAYMENT_READY, expected_version=None)
    failed, restocked = change_order_status(
        db_session, order.id, OrderStatus.FAILED, expected_version=None
    )
    assert failed.status == "FAILED"
    assert sorted(restocked) == sorted([a.id, b.id])
    assert (_stock(db_session, a.id), _stock(db_session, b.id)) == (10, 4)
    with pytest.raises(OrderStateConflict), db_session.begin_nested():
        change_order_status(db_session, order.id, OrderStatus.FAILED, expected_version=None)
    assert (_stock(db_session, a.id), _stock(db_session, b.id)) == (10, 4)
    expected = ["READY", "PAYMENT_READY", "FAILED"] if via_payment else ["READY", "FAILED"]
    assert _outbox_states(db_session, order.id) == expected


def test_every_state_entered_writes_one_outbox_row(db_session: Session) -> None:
    order_id, _ = _new_order(db_session)
    change_order_status(db_session, order_id, OrderStatus.PAYMENT_READY, expected_version=None)
    change_order_status(db_session, order_id, OrderStatus.COMPLETED, expected_version=None)
    assert _outbox_states(db_session, order_id) == ["READY", "PAYMENT_READY", "COMPLETED"]
