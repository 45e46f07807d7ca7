"""Reads that may lag, through a replica the app was given: a replica that is down or does
not have a row yet never costs the client an error; a page read there is cached briefly.

The "replica" here is the test database seen from a connection outside the test's
transaction: it sees committed rows only, so the rows a test writes are exactly the
rows a lagging replica would not have replayed yet.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import REGISTRY
from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from shared.config import Settings
from shared.db import make_probe_engine
from shared.replicas import Replica, ReplicaSet
from tests.factories import OrderFactory, OrderHistoryFactory, ProductFactory


@pytest.fixture
def replica_engine(settings: Settings) -> Iterator[Engine]:
    engine = make_probe_engine(settings, settings.sqlalchemy_url, "test-replica")
    yield engine
    engine.dispose()


def _give_replica(app: Flask, engine: Engine) -> Replica:
    replica = Replica(
        name="replica0",
        sessions=sessionmaker(bind=engine),
        probe=engine,
        covered_at=time.monotonic(),
        healthy=True,
    )
    app.extensions["replicas"] = ReplicaSet(engine, [replica], max_lag=60.0, interval=0.5)
    return replica


def _served(server: str) -> float:
    """Lagging reads this process answered from ``server`` (web.session.LAGGING_READS)."""
    return REGISTRY.get_sample_value("lagging_reads_total", {"server": server}) or 0.0


def test_a_replica_that_is_down_leaves_the_read_to_the_primary(
    app: Flask, client: FlaskClient, settings: Settings
) -> None:
    dead = make_probe_engine(settings, "postgresql+psycopg://nobody@127.0.0.1:1/none", "dead")
    replica = _give_replica(app, dead)
    token = f"t{uuid.uuid4().hex[:10]}"
    ProductFactory(name=f"{token} lamp")
    before = _served("primary")
    answer = client.get(f"/v1/products?name={token}")
    assert answer.status_code == 200
    assert [p["name"] for p in answer.get_json()["items"]] == [f"{token} lamp"]
    assert _served("primary") == before + 1
    assert not replica.healthy  # skipped until the checker finds it well
    assert replica.problem is not None
    assert "a read failed" in replica.problem
    dead.dispose()


def test_an_order_the_replica_does_not_have_yet_is_read_from_the_primary(
    app: Flask, client: FlaskClient, replica_engine: Engine
) -> None:
    replica = _give_replica(app, replica_engine)
    order = OrderFactory()  # not committed: the replica cannot see it
    OrderHistoryFactory(order_id=order.id, status="READY", created_at=order.created_at)
    answer = client.get(f"/v1/orders/{order.id}/histories")
    assert answer.status_code == 200
    assert [item["status"] for item in answer.get_json()["items"]] == ["READY"]
    assert replica.healthy  # a missing row is no failure of the replica


def test_a_listing_read_on_a_replica_is_cached_only_within_the_lag_listings_may_have(
    app: Flask, client: FlaskClient, replica_engine: Engine, settings: Settings
) -> None:
    _give_replica(app, replica_engine)
    token = f"t{uuid.uuid4().hex[:10]}"
    ProductFactory(name=f"{token} uncommitted")  # the replica does not have it
    before = _served("replica0")
    body = client.get(f"/v1/products?name={token}").get_json()
    assert body == {"items": [], "page": 1, "size": 20, "total": 0}
    assert _served("replica0") == before + 1
    cache = redis.Redis.from_url(settings.cache_url)
    try:
        keys = cache.keys(f"products:list:*{token}*")
        assert len(keys) == 1
        assert 0 < cache.pttl(keys[0]) <= 1000  # the 1 s listings may lag, less its age
    finally:
        cache.close()
