"""Products: admin create (201) and the listing's filters, sorting and paging."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared.models import Product
from tests.api.conftest import RFC3339_MS_Z, assert_error
from tests.conftest import ADMIN
from tests.factories import ProductFactory


def _list(client: FlaskClient, query: str = "") -> dict[str, Any]:
    answer = client.get(f"/v1/products?{query}")
    assert answer.status_code == 200, answer.get_data(as_text=True)
    body: dict[str, Any] = answer.get_json()
    assert set(body) == {"items", "page", "size", "total"}
    return body


def _names(body: dict[str, Any]) -> list[str]:
    return [item["name"] for item in body["items"]]


def test_create_product_answers_201_with_the_product(
    client: FlaskClient, db_session: Session
) -> None:
    answer = client.post(
        "/v1/products", json={"name": "Teapot", "price": 4_500, "stock": 12}, headers=ADMIN
    )
    assert answer.status_code == 201
    body = answer.get_json()
    assert set(body) == {"id", "name", "price", "stock", "createdAt", "updatedAt"}
    assert (body["name"], body["price"], body["stock"]) == ("Teapot", 4_500, 12)
    assert RFC3339_MS_Z.match(body["createdAt"])
    assert answer.headers["Location"] == f"/v1/products/{body['id']}"
    stored = db_session.get(Product, body["id"])
    assert stored is not None
    assert (stored.name, stored.price, stored.stock) == ("Teapot", 4_500, 12)
    assert client.get(answer.headers["Location"]).get_json() == body


@pytest.mark.parametrize(
    "name",
    ["x", "x" * 200, "Café ☕ 茶", "emoji 😀👍🏽", "\u200f\u05e9\u05dc\u05d5\u05dd", "  spaced  "],
)
def test_product_names_round_trip_exactly(client: FlaskClient, name: str) -> None:
    answer = client.post("/v1/products", json={"name": name, "price": 0, "stock": 0}, headers=ADMIN)
    assert answer.status_code == 201, answer.get_data(as_text=True)
    assert answer.get_json()["name"] == name
    assert client.get(f"/v1/products/{answer.get_json()['id']}").get_json()["name"] == name


def test_create_product_bounds(client: FlaskClient) -> None:
    top = {"name": "a", "price": 1_000_000_000, "stock": 1_000_000_000}
    assert client.post("/v1/products", json=top, headers=ADMIN).status_code == 201
    over = {"name": "x" * 201, "price": 1_000_000_001, "stock": -1}
    assert_error(
        client.post("/v1/products", json=over, headers=ADMIN),
        400,
        "VALIDATION_ERROR",
        fields={"name", "price", "stock"},
    )


def test_create_product_invalidates_cached_listings(client: FlaskClient) -> None:
    ProductFactory(name="zz-listing-cache one")
    assert _list(client, "name=zz-listing-cache")["total"] == 1
    assert _list(client, "name=zz-listing-cache")["total"] == 1  # now from the cache
    created = client.post(
        "/v1/products", json={"name": "zz-listing-cache two", "price": 1, "stock": 1}, headers=ADMIN
    )
    assert created.status_code == 201
    assert _names(_list(client, "name=zz-listing-cache")) == [
        "zz-listing-cache one",
        "zz-listing-cache two",
    ]


@pytest.fixture
def catalog() -> list[Product]:
    """Six products with a distinctive name part, in creation (id) order."""
    rows = [
        ("cat Apple", 300, 5),
        ("cat banana", 100, 0),
        ("cat CHERRY", 300, 2),
        ("cat date", 200, 0),
        ("cat Elderberry", 500, 9),
        ("cat fig_50%", 100, 1),
    ]
    return [ProductFactory(name=name, price=price, stock=stock) for name, price, stock in rows]


def test_list_defaults_to_id_ascending_with_total(
    client: FlaskClient, db_session: Session, catalog: list[Product]
) -> None:
    body = _list(client)
    total = db_session.execute(select(func.count()).select_from(Product)).scalar_one()
    assert (body["page"], body["size"], body["total"]) == (1, 20, total)
    ids = [item["id"] for item in body["items"]]
    assert ids == sorted(ids)
    assert all(
        set(item) == {"id", "name", "price", "stock", "createdAt", "updatedAt"}
        for item in body["items"]
    )


def test_name_matches_anywhere_case_insensitively(
    client: FlaskClient, catalog: list[Product]
) -> None:
    assert _names(_list(client, "name=cHeR")) == ["cat CHERRY"]
    assert _names(_list(client, "name=AT%20B")) == ["cat banana"]
    assert _list(client, "name=cat")["total"] == 6
    # LIKE wildcards are literal characters in a name filter.
    assert _names(_list(client, "name=_50%25")) == ["cat fig_50%"]
    assert _list(client, "name=cat%25e")["total"] == 0
    assert _list(client, "name=cat_d")["total"] == 0


def test_price_bounds_are_inclusive(client: FlaskClient, catalog: list[Product]) -> None:
    body = _list(client, "name=cat&minPrice=200&maxPrice=300")
    assert _names(body) == ["cat Apple", "cat CHERRY", "cat date"]
    assert body["total"] == 3
    assert _names(_list(client, "name=cat&minPrice=300&maxPrice=300")) == [
        "cat Apple",
        "cat CHERRY",
    ]
    assert _names(_list(client, "name=cat&maxPrice=100")) == ["cat banana", "cat fig_50%"]
    assert _names(_list(client, "name=cat&minPrice=500")) == ["cat Elderberry"]


def test_min_price_above_max_price_is_400(client: FlaskClient) -> None:
    assert_error(
        client.get("/v1/products?minPrice=301&maxPrice=300"),
        400,
        "VALIDATION_ERROR",
        fields={"maxPrice"},
    )


def test_in_stock_filter(client: FlaskClient, catalog: list[Product]) -> None:
    assert _names(_list(client, "name=cat&inStock=true")) == [
        "cat Apple",
        "cat CHERRY",
        "cat Elderberry",
        "cat fig_50%",
    ]
    assert _names(_list(client, "name=cat&inStock=false")) == ["cat banana", "cat date"]
    assert _list(client, "name=cat&inStock=false")["total"] == 2


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("inStock=yes", "inStock"),
        ("inStock=1", "inStock"),
        ("inStock=True", "inStock"),
        ("minPrice=-1", "minPrice"),
        ("maxPrice=1000000001", "maxPrice"),
        ("minPrice=1.5", "minPrice"),
        ("minPrice=ten", "minPrice"),
        ("sort=stock", "sort"),
        ("sort=created_at", "sort"),
        ("order=up", "order"),
        ("name=" + "x" * 201, "name"),
        ("name=%00", "name"),
    ],
)
def test_bad_listing_query_is_400(client: FlaskClient, query: str, field: str) -> None:
    assert_error(client.get(f"/v1/products?{query}"), 400, "VALIDATION_ERROR", fields={field})


@pytest.mark.parametrize(
    ("sort", "order", "expected"),
    [
        ("id", "asc", ["Apple", "banana", "CHERRY", "date", "Elderberry", "fig_50%"]),
        ("id", "desc", ["fig_50%", "Elderberry", "date", "CHERRY", "banana", "Apple"]),
        # Ties in price are broken by id, in the direction asked.
        ("price", "asc", ["banana", "fig_50%", "date", "Apple", "CHERRY", "Elderberry"]),
        ("price", "desc", ["Elderberry", "CHERRY", "Apple", "date", "fig_50%", "banana"]),
    ],
)
def test_sort_and_order(
    client: FlaskClient, catalog: list[Product], sort: str, order: str, expected: list[str]
) -> None:
    body = _list(client, f"name=cat&sort={sort}&order={order}")
    assert _names(body) == [f"cat {name}" for name in expected]


def test_sort_by_name_follows_the_database_collation(
    client: FlaskClient, catalog: list[Product]
) -> None:
    ascending = _names(_list(client, "name=cat&sort=name"))
    descending = _names(_list(client, "name=cat&sort=name&order=desc"))
    assert sorted(ascending) == sorted(p.name for p in catalog)
    assert descending == list(reversed(ascending))


def test_sort_by_created_at_breaks_ties_by_id(
    client: FlaskClient, db_session: Session, catalog: list[Product]
) -> None:
    moment = dt.datetime(2025, 5, 5, tzinfo=dt.UTC)
    first, second, third = catalog[0], catalog[1], catalog[2]
    db_session.execute(
        update(Product)
        .where(Product.id.in_([first.id, second.id]))
        .values(created_at=moment + dt.timedelta(days=1))
    )
    db_session.execute(update(Product).where(Product.id == third.id).values(created_at=moment))
    body = _list(client, "name=cat&sort=createdAt&size=3")
    assert [item["id"] for item in body["items"]] == [third.id, first.id, second.id]
    assert body["items"][0]["createdAt"] == "2025-05-05T00:00:00.000Z"
    desc = _list(client, "name=cat&sort=createdAt&order=desc")
    assert [item["id"] for item in desc["items"]][-3:] == [second.id, first.id, third.id]


def test_pages_cover_the_listing_without_overlap(
    client: FlaskClient, catalog: list[Product]
) -> None:
    pages = [_list(client, f"name=cat&sort=price&size=4&page={n}") for n in (1, 2, 3)]
    assert [len(p["items"]) for p in pages] == [4, 2, 0]
    assert all(p["total"] == 6 for p in pages)
    assert [p["page"] for p in pages] == [1, 2, 3]
    ids = [item["id"] for p in pages for item in p["items"]]
    assert sorted(ids) == sorted(p.id for p in catalog)
