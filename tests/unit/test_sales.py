"""The best-seller aggregate (units per product per UTC hour) and the ranking read from it."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import delete, func, insert, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.domain.inventory import (
    LineRequest,
    OrderRequest,
    StockSet,
    apply_inventory,
    create_order,
)
from shared.domain.orders import OrderStatus, change_order_status
from shared.domain.payments import pay
from shared.domain.points import charge_points
from shared.domain.products import create_product
from shared.domain.sales import TopSeller, top_sellers, window_start
from shared.models import ProductSales


def _now(session: Session) -> dt.datetime:
    now: dt.datetime = session.execute(select(func.now())).scalar_one()
    return now


def _this_hour(session: Session) -> dt.datetime:
    return _now(session).astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)


def _sales(session: Session, product_id: int) -> dict[dt.datetime, int]:
    return dict(
        session.execute(
            select(ProductSales.hour, ProductSales.units).where(
                ProductSales.product_id == product_id
            )
        )
        .tuples()
        .all()
    )


def _order(session: Session, user: int, *lines: tuple[int, int]) -> int:
    session.expire_all()  # lock_products reads through the identity map (a batch's session is new)
    return create_order(session, user, [LineRequest(p, q) for p, q in lines]).id


@pytest.fixture
def only_our_sales(db_session: Session) -> None:
    """The ranking reads every product: drop other tests' committed rows (rolled back after)."""
    db_session.execute(delete(ProductSales))


def test_orders_count_their_units_in_the_hour_they_were_created(db_session: Session) -> None:
    a = create_product(db_session, name="A", price=1, stock=100)
    b = create_product(db_session, name="B", price=1, stock=100)
    _order(db_session, 1, (a.id, 2), (b.id, 1))
    # Two orders and a stock set in one batch: one upsert, the stock set counts nothing.
    db_session.expire_all()
    twice = [OrderRequest(2, [LineRequest(a.id, 3)]) for _ in range(2)]
    apply_inventory(db_session, [StockSet(a.id, 50), *twice])
    hour = _this_hour(db_session)
    assert _sales(db_session, a.id) == {hour: 8}
    assert _sales(db_session, b.id) == {hour: 1}


def test_a_failed_order_is_uncounted_from_its_creation_hour_once(db_session: Session) -> None:
    a = create_product(db_session, name="A", price=1, stock=100)
    keep = _order(db_session, 1, (a.id, 2))
    gone = _order(db_session, 1, (a.id, 5))
    hour = _this_hour(db_session)
    assert _sales(db_session, a.id) == {hour: 7}

    change_order_status(db_session, gone, OrderStatus.FAILED, expected_version=None)
    assert _sales(db_session, a.id) == {hour: 2}
    # Paying or completing keeps the units: only FAILED orders are left out.
    charge_points(db_session, 1, 100)
    pay(db_session, 1, keep)
    assert _sales(db_session, a.id) == {hour: 2}


def test_the_aggregate_refuses_to_go_negative(db_session: Session) -> None:
    a = create_product(db_session, name="A", price=1, stock=100)
    db_session.execute(
        insert(ProductSales).values(hour=_this_hour(db_session), product_id=a.id, units=1)
    )
    with (
        pytest.raises(IntegrityError, match="ck_product_sales_units_non_negative"),
        db_session.begin_nested(),
    ):
        db_session.execute(
            text("UPDATE product_sales SET units = units - 2 WHERE product_id = :p"),
            {"p": a.id},
        )


@pytest.mark.parametrize(
    ("now", "days", "start"),
    [
        ("2026-11-30T10:15:00+00:00", 1, "2026-11-29T10:00:00+00:00"),
        ("2026-11-30T10:00:00+00:00", 3, "2026-11-27T10:00:00+00:00"),
        ("2026-11-30T10:59:59.999+00:00", 30, "2026-10-31T10:00:00+00:00"),
        # Another zone, half an hour off UTC: buckets are UTC hours.
        ("2026-11-30T15:45:00+05:30", 1, "2026-11-29T10:00:00+00:00"),
    ],
)
def test_the_window_starts_at_the_top_of_the_utc_hour(now: str, days: int, start: str) -> None:
    assert window_start(dt.datetime.fromisoformat(now), days) == dt.datetime.fromisoformat(start)


def _bucket(session: Session, product_id: int, hours_ago: int, units: int) -> None:
    hour = _this_hour(session) - dt.timedelta(hours=hours_ago)
    session.execute(insert(ProductSales).values(hour=hour, product_id=product_id, units=units))


@pytest.mark.usefixtures("only_our_sales")
def test_ranking_most_units_first_ties_by_id_only_units_above_zero(db_session: Session) -> None:
    a, b, c, d, e = (
        create_product(db_session, name=n, price=p, stock=0)
        for n, p in [("a", 10), ("b", 20), ("c", 30), ("d", 40), ("e", 50)]
    )
    _bucket(db_session, a.id, 0, 5)
    _bucket(db_session, b.id, 1, 3)
    _bucket(db_session, b.id, 2, 4)  # b: 7 over two hours
    _bucket(db_session, c.id, 0, 5)  # ties with a: a first (smaller id)
    _bucket(db_session, d.id, 0, 0)  # every unit failed: not ranked
    _bucket(db_session, e.id, 24 * 3 + 1, 100)  # before the 3-day window
    db_session.execute(
        text("UPDATE products SET name = 'a2', price = 11 WHERE id = :i"), {"i": a.id}
    )
    db_session.expire_all()

    ranking = top_sellers(db_session, days=3, limit=10)

    assert ranking.days == 3
    assert ranking.generated_at == _now(db_session)
    assert ranking.items == [
        TopSeller(b.id, "b", 20, 7),
        TopSeller(a.id, "a2", 11, 5),  # the product's current name and price
        TopSeller(c.id, "c", 30, 5),
    ]
    assert [t.product_id for t in top_sellers(db_session, days=3, limit=2).items] == [b.id, a.id]
    longer = top_sellers(db_session, days=4, limit=10)
    assert longer.items[0] == TopSeller(e.id, "e", 50, 100)


@pytest.mark.usefixtures("only_our_sales")
def test_the_window_is_days_times_24_hours_rounded_up_to_the_hour(db_session: Session) -> None:
    a = create_product(db_session, name="a", price=1, stock=0)
    now = _now(db_session)
    first = window_start(now, 1)
    for hour, units in [(first - dt.timedelta(hours=1), 1000), (first, 7)]:
        db_session.execute(insert(ProductSales).values(hour=hour, product_id=a.id, units=units))
    assert top_sellers(db_session, days=1, limit=5).items == [TopSeller(a.id, "a", 1, 7)]


@pytest.mark.usefixtures("only_our_sales")
def test_ranking_follows_orders_as_they_are_placed_and_failed(db_session: Session) -> None:
    a = create_product(db_session, name="a", price=1, stock=100)
    b = create_product(db_session, name="b", price=1, stock=100)
    _order(db_session, 1, (a.id, 2))
    big = _order(db_session, 1, (b.id, 3))
    assert [
        (t.product_id, t.units_sold) for t in top_sellers(db_session, days=1, limit=5).items
    ] == [
        (b.id, 3),
        (a.id, 2),
    ]
    change_order_status(db_session, big, OrderStatus.FAILED, expected_version=None)
    assert [
        (t.product_id, t.units_sold) for t in top_sellers(db_session, days=1, limit=5).items
    ] == [(a.id, 2)]
