"""Product rules on a real database: listing, stock guards, the schema's own refusal."""

from __future__ import annotations

import datetime as dt
import re
import uuid

import pytest
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.domain.errors import ErrorCode, NotFound, ProductNotFound
from shared.domain.inventory import set_stock
from shared.domain.products import (
    ProductQuery,
    ProductSort,
    create_product,
    get_product,
    get_products,
    list_products,
    product_document,
    return_stock,
)
from shared.models import Product

RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def token() -> str:
    """A name fragment no other test's product carries (listings are filtered by it)."""
    return f"t{uuid.uuid4().hex[:12]}"


def _names(rows: list[Product]) -> list[str]:
    return [p.name for p in rows]


def test_create_then_get_returns_the_product_as_the_api_shows_it(db_session: Session) -> None:
    product = create_product(db_session, name="Lamp", price=1_500, stock=7)
    got = get_product(db_session, product.id)
    doc = product_document(got)
    assert set(doc) == {"id", "name", "price", "stock", "createdAt", "updatedAt"}
    assert (doc["id"], doc["name"], doc["price"], doc["stock"]) == (product.id, "Lamp", 1_500, 7)
    assert RFC3339_MS.match(doc["createdAt"])
    assert RFC3339_MS.match(doc["updatedAt"])
    assert product.version == 1


def test_get_unknown_product_is_not_found(db_session: Session) -> None:
    with pytest.raises(NotFound) as caught:
        get_product(db_session, 2**63 - 1)
    assert caught.value.code is ErrorCode.NOT_FOUND


def test_name_filter_is_case_insensitive_and_matches_anywhere(
    db_session: Session, token: str
) -> None:
    create_product(db_session, name=f"{token} Red SHIRT", price=1, stock=1)
    create_product(db_session, name=f"{token} blue shirt", price=1, stock=1)
    create_product(db_session, name=f"{token} hat", price=1, stock=1)
    rows, total = list_products(db_session, ProductQuery(name=f"{token.upper()} "))
    assert total == 3
    rows, total = list_products(db_session, ProductQuery(name="ShIrT"))
    assert {f"{token} Red SHIRT", f"{token} blue shirt"} <= set(_names(rows))
    assert f"{token} hat" not in _names(rows)


def test_name_filter_treats_like_wildcards_literally(db_session: Session, token: str) -> None:
    create_product(db_session, name=f"{token} 50% off", price=1, stock=1)
    create_product(db_session, name=f"{token} 50 of", price=1, stock=1)
    create_product(db_session, name=f"{token} a_b", price=1, stock=1)
    create_product(db_session, name=f"{token} axb", price=1, stock=1)
    rows, _ = list_products(db_session, ProductQuery(name=f"{token} 50%"))
    assert _names(rows) == [f"{token} 50% off"]
    rows, _ = list_products(db_session, ProductQuery(name=f"{token} a_b"))
    assert _names(rows) == [f"{token} a_b"]


def test_price_bounds_are_inclusive(db_session: Session, token: str) -> None:
    for price in (99, 100, 150, 200, 201):
        create_product(db_session, name=f"{token} p{price}", price=price, stock=1)
    rows, total = list_products(db_session, ProductQuery(name=token, min_price=100, max_price=200))
    assert [p.price for p in rows] == [100, 150, 200]
    assert total == 3
    rows, _ = list_products(db_session, ProductQuery(name=token, min_price=200))
    assert [p.price for p in rows] == [200, 201]
    rows, _ = list_products(db_session, ProductQuery(name=token, max_price=100))
    assert [p.price for p in rows] == [99, 100]


def test_in_stock_true_means_positive_stock_and_false_means_zero(
    db_session: Session, token: str
) -> None:
    create_product(db_session, name=f"{token} none", price=1, stock=0)
    create_product(db_session, name=f"{token} one", price=1, stock=1)
    create_product(db_session, name=f"{token} many", price=1, stock=50)
    rows, total = list_products(db_session, ProductQuery(name=token, in_stock=True))
    assert (_names(rows), total) == ([f"{token} one", f"{token} many"], 2)
    rows, total = list_products(db_session, ProductQuery(name=token, in_stock=False))
    assert (_names(rows), total) == ([f"{token} none"], 1)
    _, total = list_products(db_session, ProductQuery(name=token))
    assert total == 3


def test_default_sort_is_id_ascending(db_session: Session, token: str) -> None:
    ids = [create_product(db_session, name=f"{token} {c}", price=1, stock=1).id for c in "cab"]
    rows, _ = list_products(db_session, ProductQuery(name=token))
    assert [p.id for p in rows] == sorted(ids)
    rows, _ = list_products(db_session, ProductQuery(name=token, descending=True))
    assert [p.id for p in rows] == sorted(ids, reverse=True)


def test_sort_by_name_breaks_ties_by_id(db_session: Session, token: str) -> None:
    b1 = create_product(db_session, name=f"{token} banana", price=1, stock=1)
    a = create_product(db_session, name=f"{token} apple", price=1, stock=1)
    b2 = create_product(db_session, name=f"{token} banana", price=1, stock=1)
    c = create_product(db_session, name=f"{token} cherry", price=1, stock=1)
    rows, _ = list_products(db_session, ProductQuery(name=token, sort=ProductSort.NAME))
    assert [p.id for p in rows] == [a.id, b1.id, b2.id, c.id]
    rows, _ = list_products(
        db_session, ProductQuery(name=token, sort=ProductSort.NAME, descending=True)
    )
    # Descending is the exact reverse: the tie keeps its id order reversed too.
    assert [p.id for p in rows] == [c.id, b2.id, b1.id, a.id]


def test_sort_by_price_breaks_ties_by_id(db_session: Session, token: str) -> None:
    mid1 = create_product(db_session, name=f"{token} m1", price=500, stock=1)
    high = create_product(db_session, name=f"{token} h", price=900, stock=1)
    mid2 = create_product(db_session, name=f"{token} m2", price=500, stock=1)
    low = create_product(db_session, name=f"{token} l", price=100, stock=1)
    rows, _ = list_products(db_session, ProductQuery(name=token, sort=ProductSort.PRICE))
    assert [p.id for p in rows] == [low.id, mid1.id, mid2.id, high.id]
    rows, _ = list_products(
        db_session, ProductQuery(name=token, sort=ProductSort.PRICE, descending=True)
    )
    assert [p.id for p in rows] == [high.id, mid2.id, mid1.id, low.id]


def test_sort_by_created_at_breaks_ties_by_id(db_session: Session, token: str) -> None:
    base = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    made = {}
    for label, offset in (("late", 3), ("early", 1), ("tie_a", 2), ("tie_b", 2)):
        product = create_product(db_session, name=f"{token} {label}", price=1, stock=1)
        db_session.execute(
            update(Product)
            .where(Product.id == product.id)
            .values(created_at=base + dt.timedelta(hours=offset))
        )
        made[label] = product.id
    rows, _ = list_products(db_session, ProductQuery(name=token, sort=ProductSort.CREATED_AT))
    assert [p.id for p in rows] == [made["early"], made["tie_a"], made["tie_b"], made["late"]]
    rows, _ = list_products(
        db_session, ProductQuery(name=token, sort=ProductSort.CREATED_AT, descending=True)
    )
    assert [p.id for p in rows] == [made["late"], made["tie_b"], made["tie_a"], made["early"]]


def test_pages_cover_every_match_once_and_total_counts_all(db_session: Session, token: str) -> None:
    ids = [create_product(db_session, name=f"{token} {i}", price=i, stock=1).id for i in range(5)]
    seen: list[int] = []
    for page in (1, 2, 3):
        rows, total = list_products(db_session, ProductQuery(name=token, page=page, size=2))
        assert total == 5
        seen += [p.id for p in rows]
    assert seen == ids
    rows, total = list_products(db_session, ProductQuery(name=token, page=4, size=2))
    assert (rows, total) == ([], 5)


def test_filters_combine(db_session: Session, token: str) -> None:
    create_product(db_session, name=f"{token} Mug", price=300, stock=0)
    keep = create_product(db_session, name=f"{token} mug XL", price=400, stock=2)
    create_product(db_session, name=f"{token} mug S", price=50, stock=2)
    create_product(db_session, name=f"{token} plate", price=400, stock=2)
    rows, total = list_products(
        db_session, ProductQuery(name=f"{token} MUG", min_price=100, in_stock=True)
    )
    assert ([p.id for p in rows], total) == ([keep.id], 1)


def test_set_stock_sets_the_value_and_bumps_version(db_session: Session) -> None:
    product = create_product(db_session, name="Desk", price=10, stock=3)
    updated = set_stock(db_session, product.id, 42)
    assert (updated.stock, updated.version) == (42, 2)
    assert product_document(updated)["stock"] == 42
    db_session.expire_all()
    assert get_product(db_session, product.id).stock == 42
    assert set_stock(db_session, product.id, 0).stock == 0


def test_set_stock_of_unknown_product_is_product_not_found(db_session: Session) -> None:
    with pytest.raises(ProductNotFound) as caught:
        set_stock(db_session, 2**63 - 1, 5)
    assert caught.value.code is ErrorCode.PRODUCT_NOT_FOUND


def test_return_stock_adds_back(db_session: Session) -> None:
    product = create_product(db_session, name="Sofa", price=10, stock=1)
    set_stock(db_session, product.id, 0)
    return_stock(db_session, product.id, 4)
    db_session.expire_all()
    assert get_product(db_session, product.id).stock == 4


def test_get_products_reads_current_rows(db_session: Session) -> None:
    a = create_product(db_session, name="A", price=1, stock=1)
    b = create_product(db_session, name="B", price=1, stock=1)
    set_stock(db_session, a.id, 0)
    fresh = {p.id: p.stock for p in get_products(db_session, [a.id, b.id, 2**63 - 1])}
    assert fresh == {a.id: 0, b.id: 1}
    assert get_products(db_session, []) == []


def test_database_refuses_negative_stock_on_its_own(db_session: Session) -> None:
    product = create_product(db_session, name="Bed", price=10, stock=1)
    with (
        pytest.raises(IntegrityError, match="ck_products_stock_non_negative"),
        db_session.begin_nested(),
    ):
        db_session.execute(update(Product).where(Product.id == product.id).values(stock=-1))
    db_session.expire_all()
    assert get_product(db_session, product.id).stock == 1
