"""API tests: the Flask test client on the rolled-back test session.

Factories write into the same connection as the app, so rows they flush are
visible to the request and vanish with the test's outer transaction.  The
product cache lives in real Redis and outlives that rollback, so it is emptied
before each test (ids never repeat, but cached listings would).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from werkzeug.test import TestResponse

from shared.config import Settings
from shared.models import Coupon, Job, Order, PointBalance, Product, UserCoupon
from tests.factories import bind_factories

RFC3339_MS_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@pytest.fixture(autouse=True)
def _factories(db_session: Session) -> Iterator[None]:
    with bind_factories(db_session):
        yield


@pytest.fixture(autouse=True)
def _empty_product_cache(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.cache_url)
    client.flushdb()
    client.close()


def assert_error(
    response: TestResponse, status: int, code: str, *, fields: set[str] | None = None
) -> dict[str, Any]:
    """The answer is ``status`` with the one error shape; ``fields`` are the details named."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    if fields is not None:
        details = body["error"]["details"]
        assert isinstance(details, list)
        assert {d["field"] for d in details} == fields, details
        assert all(set(d) == {"field", "message"} and d["message"] for d in details)
    error: dict[str, Any] = body["error"]
    return error


def row_counts(session: Session) -> dict[str, int]:
    """How many rows each table a request could change holds (seen on the test connection)."""
    return {
        model.__tablename__: session.execute(select(func.count()).select_from(model)).scalar_one()
        for model in (Job, Product, Coupon, Order, PointBalance, UserCoupon)
    }
