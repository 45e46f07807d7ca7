"""GET /v1/products/top: the ranking's shape and defaults, and its Redis cache."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
import redis
from flask.testing import FlaskClient
from sqlalchemy import delete, func, insert, select
from sqlalchemy.orm import Session, sessionmaker

from shared.config import Settings
from shared.models import ProductSales
from shared.top_sellers_cache import top_sellers_key
from tests.api.conftest import RFC3339_MS_Z
from tests.conftest import RecordingPublisher, create_test_app
from tests.factories import ProductFactory


@pytest.fixture(autouse=True)
def only_our_sales(db_session: Session) -> None:
    """The ranking reads every product: drop other tests' committed rows (rolled back after)."""
    db_session.execute(delete(ProductSales))


def _sold(session: Session, product_id: int, units: int, hours_ago: int = 0) -> None:
    now: dt.datetime = session.execute(select(func.now())).scalar_one()
    hour = now.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)
    session.execute(
        insert(ProductSales).values(
            hour=hour - dt.timedelta(hours=hours_ago), product_id=product_id, units=units
        )
    )


def test_defaults_shape_and_order(client: FlaskClient, db_session: Session) -> None:
    products = [ProductFactory(name=f"p{n}", price=100 + n) for n in range(7)]
    for n, product in enumerate(products):
        _sold(db_session, product.id, 10 + n % 3)  # 10, 11, 12, 10, 11, 12, 10
    _sold(db_session, products[0].id, 50, hours_ago=24 * 3 + 1)  # outside the default 3 days

    answer = client.get("/v1/products/top")

    assert answer.status_code == 200
    body = answer.get_json()
    assert list(body) == ["items", "days", "generatedAt"]
    assert body["days"] == 3
    assert RFC3339_MS_Z.match(body["generatedAt"])
    by_rank = sorted(products, key=lambda p: (-(10 + products.index(p) % 3), p.id))[:5]
    assert body["items"] == [
        {
            "productId": p.id,
            "name": p.name,
            "price": p.price,
            "unitsSold": 10 + products.index(p) % 3,
        }
        for p in by_rank
    ]


def test_days_and_limit(client: FlaskClient, db_session: Session) -> None:
    old, new = ProductFactory(), ProductFactory()
    _sold(db_session, old.id, 100, hours_ago=24 * 10)
    _sold(db_session, new.id, 1)
    assert [i["productId"] for i in client.get("/v1/products/top?days=1").get_json()["items"]] == [
        new.id
    ]
    body = client.get("/v1/products/top?days=30&limit=1").get_json()
    assert (body["days"], [i["productId"] for i in body["items"]]) == (30, [old.id])


def test_the_ranking_is_cached_then_recomputed(
    client: FlaskClient, db_session: Session, settings: Settings
) -> None:
    first = ProductFactory()
    _sold(db_session, first.id, 5)
    cached = client.get("/v1/products/top?days=2").get_json()
    assert [i["productId"] for i in cached["items"]] == [first.id]

    later = ProductFactory()
    _sold(db_session, later.id, 9)
    # Within the cache's life the same ranking is served, whatever limit asks for.
    again = client.get("/v1/products/top?days=2&limit=100").get_json()
    assert again == cached
    cache = redis.Redis.from_url(settings.cache_url)
    try:
        ttl = cache.ttl(top_sellers_key(2))
        assert 0 < ttl <= settings.top_sellers_cache_seconds <= 60
        cache.delete(top_sellers_key(2))  # as if it had expired
    finally:
        cache.close()
    fresh = client.get("/v1/products/top?days=2").get_json()
    assert [i["productId"] for i in fresh["items"]] == [later.id, first.id]
    assert fresh["generatedAt"] >= cached["generatedAt"]
    # Another window is its own entry.
    assert client.get("/v1/products/top?days=1").get_json()["items"][0]["productId"] == later.id


def test_without_redis_the_ranking_is_computed_from_postgresql(
    settings: Settings,
    session_factory: sessionmaker[Session],
    publisher: RecordingPublisher,
    db_session: Session,
) -> None:
    product = ProductFactory()
    _sold(db_session, product.id, 3)
    dead = dataclasses.replace(settings, redis_url="redis://127.0.0.1:1/0")
    client = create_test_app(dead, session_factory, publisher).test_client()
    for _ in range(2):
        answer = client.get("/v1/products/top")
        assert answer.status_code == 200
        assert [i["unitsSold"] for i in answer.get_json()["items"]] == [3]
