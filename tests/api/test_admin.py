"""GET /v1/admin/partitions: every partition queue, its PENDING jobs, their age, its last drain.

The app here runs with PARTITIONS=20: queues 16..19 of each kind are ones the e2e
stack (16 partitions, same database and Redis) never touches, so what they show
is exactly what each test put there.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid

import pytest
import redis
from flask.testing import FlaskClient
from sqlalchemy import func, insert
from sqlalchemy.orm import Session, sessionmaker

from shared.config import Settings
from shared.jobs import LAST_DRAIN_KEY, JobStatus, note_drain
from shared.models import Job
from shared.partitions import all_partition_queues
from tests.api.conftest import assert_error
from tests.conftest import ADMIN, RecordingPublisher, create_test_app

PATH = "/v1/admin/partitions"


@pytest.fixture
def client20(
    settings: Settings, session_factory: sessionmaker[Session], publisher: RecordingPublisher
) -> FlaskClient:
    app = create_test_app(dataclasses.replace(settings, partitions=20), session_factory, publisher)
    return app.test_client()


def add_job(
    session: Session, queue: str, *, age_seconds: float = 0, status: JobStatus = JobStatus.PENDING
) -> None:
    """A job row on ``queue`` created ``age_seconds`` before the test transaction began
    (``now()`` is that transaction's start, for the insert and the read alike)."""
    session.execute(
        insert(Job).values(
            id=uuid.uuid4(),
            kind="POINTS_CHARGE",
            partition=queue,
            payload={"userId": 1, "amount": 1},
            status=status.value,
            created_at=func.now() - dt.timedelta(seconds=age_seconds),
        )
    )
    session.flush()


def test_partitions_needs_the_admin_token(client: FlaskClient) -> None:
    assert_error(client.get(PATH), 401, "UNAUTHENTICATED")
    assert_error(client.get(PATH, headers={"Authorization": "Bearer nope"}), 403, "FORBIDDEN")


def test_every_queue_with_its_backlog_oldest_age_and_last_drain(
    client20: FlaskClient, settings: Settings, db_session: Session
) -> None:
    for age in (5, 2.5, 0):
        add_job(db_session, "user.17", age_seconds=age)
    add_job(db_session, "user.17", age_seconds=60, status=JobStatus.SUCCEEDED)  # not pending
    add_job(db_session, "coupon.19")
    add_job(db_session, "user.25", age_seconds=1)  # beyond PARTITIONS: still shown
    add_job(db_session, "user.25", age_seconds=3)
    flags = redis.Redis.from_url(settings.broker_url)
    drained_at = dt.datetime(2026, 11, 30, 4, 15, 35, 123000, tzinfo=dt.UTC)
    flags.hset(LAST_DRAIN_KEY, "product.18", str(int(drained_at.timestamp() * 1000)))
    flags.hdel(LAST_DRAIN_KEY, "user.16", "user.17", "coupon.19")

    answer = client20.get(PATH, headers=ADMIN)
    assert answer.status_code == 200
    items = answer.get_json()["items"]
    assert [i["queue"] for i in items] == [*all_partition_queues(20), "user.25"]
    assert all(
        set(i) == {"queue", "kind", "pending", "oldestPendingAgeMs", "lastDrainAt"} for i in items
    )
    assert all(i["kind"] == i["queue"].split(".")[0] for i in items)
    by_queue = {i["queue"]: i for i in items}
    assert by_queue["user.17"] == {
        "queue": "user.17",
        "kind": "user",
        "pending": 3,
        "oldestPendingAgeMs": 5000,
        "lastDrainAt": None,
    }
    assert (by_queue["coupon.19"]["pending"], by_queue["coupon.19"]["oldestPendingAgeMs"]) == (1, 0)
    assert (by_queue["user.25"]["pending"], by_queue["user.25"]["oldestPendingAgeMs"]) == (2, 3000)
    assert by_queue["user.16"] == {
        "queue": "user.16",
        "kind": "user",
        "pending": 0,
        "oldestPendingAgeMs": None,
        "lastDrainAt": None,
    }
    assert by_queue["product.18"]["lastDrainAt"] == "2026-11-30T04:15:35.123Z"
    flags.hdel(LAST_DRAIN_KEY, "product.18")
    flags.close()


def test_note_drain_records_the_moment_of_the_drain(settings: Settings) -> None:
    flags = redis.Redis.from_url(settings.broker_url)
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    note_drain(flags, ["coupon.18"])
    after = dt.datetime.now(dt.UTC)
    noted = dt.datetime.fromtimestamp(int(flags.hget(LAST_DRAIN_KEY, "coupon.18")) / 1000, dt.UTC)  # type: ignore[arg-type]
    assert before <= noted <= after
    flags.hdel(LAST_DRAIN_KEY, "coupon.18")
    flags.close()


def test_partitions_is_503_while_redis_is_away(
    settings: Settings, session_factory: sessionmaker[Session], publisher: RecordingPublisher
) -> None:
    away = dataclasses.replace(settings, redis_url="redis://127.0.0.1:1/0")
    client = create_test_app(away, session_factory, publisher).test_client()
    answer = client.get(PATH, headers=ADMIN)
    assert_error(answer, 503, "UNAVAILABLE")
    assert answer.headers["Retry-After"] == "1"
