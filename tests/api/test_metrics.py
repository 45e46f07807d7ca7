"""GET /metrics: Prometheus text with the job, cache and backlog metrics.

The test process runs without PROMETHEUS_MULTIPROC_DIR, so /metrics shows this
process's own registry (the e2e test covers the multiprocess sum).  Counters are
process-wide and cumulative: each test compares a scrape after with one before.
The app runs with PARTITIONS=20: queues 16..19 of each kind are ones the e2e
stack (16 partitions, same database) never touches, so their backlog is exactly
what the test put there.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid

import pytest
from flask.testing import FlaskClient
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, insert
from sqlalchemy.orm import Session, sessionmaker

from shared.config import Settings
from shared.models import Job
from shared.partitions import PartitionKind, all_partition_queues, partition
from tests.conftest import RecordingPublisher, create_test_app
from tests.factories import ProductFactory

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def client20(
    settings: Settings, session_factory: sessionmaker[Session], publisher: RecordingPublisher
) -> FlaskClient:
    app = create_test_app(dataclasses.replace(settings, partitions=20), session_factory, publisher)
    return app.test_client()


def scrape(client: FlaskClient) -> Samples:
    answer = client.get("/metrics")
    assert answer.status_code == 200
    assert answer.mimetype == "text/plain"
    assert answer.headers["Content-Type"] == CONTENT_TYPE_LATEST  # the text exposition format
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(answer.get_data(as_text=True))
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def user_on_a_spare_partition() -> tuple[int, str]:
    """A fresh user id whose partition (of 20) is one the e2e stack never drains."""
    for _ in range(10_000):
        user = uuid.uuid4().int % 10**9
        queue = partition(PartitionKind.USER, user, 20)
        if int(queue.split(".")[1]) >= 16:
            return user, queue
    pytest.fail("no user on partitions 16..19")


def test_accepted_jobs_are_counted_by_kind_and_pending_ones_show_in_the_backlog(
    client20: FlaskClient, db_session: Session
) -> None:
    user, queue = user_on_a_spare_partition()
    before = scrape(client20)
    for amount in range(1, 6):
        answer = client20.post("/v1/points/charge", json={"userId": user, "amount": amount})
        assert answer.status_code == 202
    keyed = {"Idempotency-Key": f"metrics-{uuid.uuid4()}"}
    for _ in range(2):  # the replay is the same job: counted once
        answer = client20.post("/v1/points/use", json={"userId": user, "amount": 1}, headers=keyed)
        assert answer.status_code == 202
    # An older PENDING job of the same partition: the oldest pending age is its age.
    db_session.execute(
        insert(Job).values(
            id=uuid.uuid4(),
            kind="POINTS_CHARGE",
            partition=queue,
            payload={"userId": user, "amount": 1},
            created_at=func.now() - dt.timedelta(seconds=42),
        )
    )
    db_session.flush()
    after = scrape(client20)

    def accepted(samples: Samples, kind: str) -> float:
        return value(samples, "shop_jobs_accepted_total", kind=kind)

    assert accepted(after, "POINTS_CHARGE") - accepted(before, "POINTS_CHARGE") == 5
    assert accepted(after, "POINTS_USE") - accepted(before, "POINTS_USE") == 1
    labels = {"queue": queue, "kind": "user"}
    assert value(before, "shop_partition_pending_jobs", **labels) == 0
    assert value(after, "shop_partition_pending_jobs", **labels) == 7
    age = value(after, "shop_partition_oldest_pending_age_seconds", **labels)
    assert 42 <= age < 42 + 60
    queues = {dict(key[1])["queue"] for key in after if key[0] == "shop_partition_pending_jobs"}
    assert queues == set(all_partition_queues(20))


def test_product_reads_count_cache_hits_and_misses(client: FlaskClient) -> None:
    product = ProductFactory(stock=3)

    def lookups(samples: Samples, result: str) -> float:
        return value(samples, "shop_cache_lookups_total", cache="product", result=result)

    before = scrape(client)
    assert client.get(f"/v1/products/{product.id}").status_code == 200  # miss, then filled
    assert client.get(f"/v1/products/{product.id}").status_code == 200  # hit
    after = scrape(client)
    assert lookups(after, "miss") - lookups(before, "miss") == 1
    assert lookups(after, "hit") - lookups(before, "hit") == 1


def test_metrics_survive_a_database_that_cannot_be_read(
    settings: Settings, publisher: RecordingPublisher
) -> None:
    """The backlog gauges are left out; the rest of the scrape still answers."""
    from sqlalchemy import create_engine

    from shared.db import make_session_factory

    dead = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none", pool_pre_ping=False)
    client = create_test_app(settings, make_session_factory(dead), publisher).test_client()
    samples = scrape(client)
    assert not any(name == "shop_partition_pending_jobs" for name, _ in samples)
    assert any(name.startswith("http_request") for name, _ in samples)
    dead.dispose()
