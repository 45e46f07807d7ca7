"""Gray failures on the real database and Redis: bounded waits and a stalled drainer.

A drainer that stalls inside its transaction (a frozen process, a blackhole) loses the
transaction to the server's ``idle_in_transaction_session_timeout``; when it resumes,
its COMMIT fails and nothing of the batch may be announced: no outcome counted, no
``jobs:finished`` notification, no cache refresh.  These tests use a real engine
(``make_engine``), not the rolled-back test transaction, because the server must end
the session for real.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis
from sqlalchemy import delete, text
from sqlalchemy.exc import DBAPIError

import workers.base
import workers.points  # registers the points handler
from shared.config import Settings
from shared.db import make_engine
from shared.domain.points import get_balance
from shared.jobs import (
    FINISHED_CHANNEL_PREFIX,
    JobKind,
    JobStatus,
    NewJob,
    WrittenTooLate,
    record,
    record_many,
)
from shared.models import Job
from workers.base import Runtime, apply_next_batch, is_transient

IDLE_MS = 300


@pytest.fixture
def stalling_runtime(settings: Settings) -> Iterator[Runtime]:
    """A worker runtime on its own engine whose sessions the server ends after IDLE_MS idle."""
    rt = Runtime(
        dataclasses.replace(settings, db_idle_in_transaction_timeout_ms=IDLE_MS),
        lambda _queue: None,
    )
    yield rt
    rt.session_factory.kw["bind"].dispose()


# The web process the test's jobs name as waiting for them (``reply_to``).
CHANNEL = f"{FINISHED_CHANNEL_PREFIX}gray-{uuid.uuid4().hex}"


class Finished:
    """Every document published on CHANNEL while the test runs."""

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url, socket_timeout=2)
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        self._pubsub.subscribe(CHANNEL)
        self._pubsub.get_message(timeout=1)  # the subscription's confirmation
        self.seen: list[dict[str, Any]] = []

    def collect(self, seconds: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            message = self._pubsub.get_message(timeout=left)
            if message is not None and message["type"] == "message":
                self.seen.append(json.loads(message["data"]))
        return self.seen

    def close(self) -> None:
        self._pubsub.close()
        self._client.close()


@pytest.fixture
def finished_messages(settings: Settings) -> Iterator[Finished]:
    finished = Finished(settings.broker_url)
    yield finished
    finished.close()


def _charge(rt: Runtime, user: int, amount: int) -> tuple[uuid.UUID, str]:
    with rt.session_factory() as session, session.begin():
        job = record(
            session,
            kind=JobKind.POINTS_CHARGE,
            payload={"userId": user, "amount": amount},
            partitions=rt.settings.partitions,
            reply_to=CHANNEL,
        ).job
        return job.id, job.partition


def test_a_drain_whose_transaction_the_server_ended_announces_nothing(
    stalling_runtime: Runtime,
    finished_messages: Finished,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rt = stalling_runtime
    user = uuid.uuid4().int % 10**15 + 1
    job_id, queue = _charge(rt, user, 7)
    announced: list[Any] = []
    real_after_commit = workers.base.after_commit
    monkeypatch.setattr(
        workers.base,
        "after_commit",
        lambda rt_, effects: (announced.append(effects), real_after_commit(rt_, effects)),
    )
    real_mark = workers.base.mark_products_pending

    def stall_then_mark(rt_: Runtime, session: Any, effects: Any) -> None:
        time.sleep(IDLE_MS / 1000 * 3)  # frozen inside the transaction, before COMMIT
        real_mark(rt_, session, effects)

    monkeypatch.setattr(workers.base, "mark_products_pending", stall_then_mark)
    try:
        with pytest.raises(DBAPIError) as caught:
            apply_next_batch(rt, [queue])
        # The session was ended by the server: a disconnect, retried, never an attempt.
        assert is_transient(caught.value), caught.value
        assert "idle-in-transaction" in str(caught.value)
        assert announced == []  # after_commit never ran: nothing counted, cached, published
        assert finished_messages.collect(0.5) == []
        with rt.session_factory() as session:
            job = session.get_one(Job, job_id)
            assert (job.status, job.attempts) == (JobStatus.PENDING.value, 0)
            assert get_balance(session, user).amount == 0

        # Resumed (no more stall): the job is applied once, announced once.
        monkeypatch.setattr(workers.base, "mark_products_pending", real_mark)
        assert apply_next_batch(rt, [queue]) == 1
        with rt.session_factory() as session:
            assert get_balance(session, user).amount == 7
        published = finished_messages.collect(1.0)
        ids = [jid for document in published for jid in document]
        assert ids.count(str(job_id)) == 1
        assert published[0][str(job_id)]["status"] == JobStatus.SUCCEEDED.value
    finally:
        monkeypatch.undo()
        with rt.session_factory() as session, session.begin():  # if left PENDING by a failure
            session.execute(delete(Job).where(Job.id == job_id, Job.status == "PENDING"))


def test_a_commit_that_raises_publishes_nothing(
    stalling_runtime: Runtime, finished_messages: Finished, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection breaks at COMMIT itself (its backend terminated): no announcement."""
    rt = stalling_runtime
    user = uuid.uuid4().int % 10**15 + 1
    job_id, queue = _charge(rt, user, 3)
    announced: list[Any] = []
    real_after_commit = workers.base.after_commit
    monkeypatch.setattr(
        workers.base,
        "after_commit",
        lambda rt_, effects: (announced.append(effects), real_after_commit(rt_, effects)),
    )
    real_mark = workers.base.mark_products_pending

    def terminate_own_backend(rt_: Runtime, session: Any, effects: Any) -> None:
        real_mark(rt_, session, effects)
        pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with psycopg.connect(rt_.settings.database_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

    monkeypatch.setattr(workers.base, "mark_products_pending", terminate_own_backend)
    try:
        with pytest.raises(DBAPIError) as caught:
            apply_next_batch(rt, [queue])
        assert is_transient(caught.value)
        assert announced == []
        assert finished_messages.collect(0.5) == []
        with rt.session_factory() as session:
            assert session.get_one(Job, job_id).status == JobStatus.PENDING.value
            assert get_balance(session, user).amount == 0
    finally:
        monkeypatch.undo()
        with rt.session_factory() as session, session.begin():
            session.execute(delete(Job).where(Job.id == job_id))


def test_a_frozen_answer_is_given_up_after_the_client_timeout(settings: Settings) -> None:
    """A statement whose answer does not come (here: the server sleeps) fails after
    DB_CLIENT_TIMEOUT_MS on the client, whatever the server's own timeouts say."""
    engine = make_engine(
        dataclasses.replace(settings, db_client_timeout_ms=500), pool_size=1, pre_ping=False
    )
    try:
        started = time.monotonic()
        with pytest.raises(DBAPIError) as caught, engine.connect() as connection:
            connection.execute(text("SELECT pg_sleep(5)"))
        took = time.monotonic() - started
        assert 0.4 < took < 2.0, took
        assert caught.value.connection_invalidated
        with engine.connect() as connection:  # the pool hands out a fresh connection
            assert connection.execute(text("SELECT 1")).scalar_one() == 1
    finally:
        engine.dispose()


def test_every_session_carries_the_gray_failure_bounds(settings: Settings) -> None:
    engine = make_engine(settings, pool_size=1, pre_ping=False)
    try:
        with engine.connect() as connection:
            shown = {
                name: connection.execute(text(f"SHOW {name}")).scalar_one()
                for name in (
                    "idle_in_transaction_session_timeout",
                    "tcp_keepalives_idle",
                    "tcp_keepalives_interval",
                    "tcp_keepalives_count",
                    "tcp_user_timeout",
                )
            }
    finally:
        engine.dispose()
    assert shown == {
        "idle_in_transaction_session_timeout": "5s",
        "tcp_keepalives_idle": "5",
        "tcp_keepalives_interval": "2",
        "tcp_keepalives_count": "3",
        "tcp_user_timeout": "10000",
    }


def test_a_job_insert_received_after_its_deadline_writes_nothing(db_session: Any) -> None:
    """A server frozen with the INSERT in its buffer resumes after web answered 503:
    the statement is received too late and writes no row (keyed or not)."""
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    job_id = uuid.uuid4()
    with pytest.raises(WrittenTooLate):
        record_many(
            db_session,
            [NewJob(job_id, JobKind.POINTS_CHARGE, "user.0", {"userId": 1, "amount": 1})],
            deadline=past,
        )
    with pytest.raises(WrittenTooLate):
        record(
            db_session,
            kind=JobKind.POINTS_CHARGE,
            payload={"userId": 1, "amount": 1},
            partitions=16,
            idempotency_scope=f"POST /v1/points/charge {job_id}",
            request_hash="x",
            deadline=past,
        )
    assert db_session.get(Job, job_id) is None
    assert (
        db_session.scalar(
            text("SELECT count(*) FROM jobs WHERE idempotency_key LIKE :k"), {"k": f"%{job_id}"}
        )
        == 0
    )
    # In time, both write (and the key's replay finds its row, whatever the deadline).
    future = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5)
    made = record_many(
        db_session,
        [NewJob(job_id, JobKind.POINTS_CHARGE, "user.0", {"userId": 1, "amount": 1})],
        deadline=future,
    )
    assert [j.id for j in made] == [job_id]
    keyed = record(
        db_session,
        kind=JobKind.POINTS_CHARGE,
        payload={"userId": 1, "amount": 1},
        partitions=16,
        idempotency_scope=f"POST /v1/points/charge {job_id}",
        request_hash="x",
        deadline=future,
    )
    replay = record(
        db_session,
        kind=JobKind.POINTS_CHARGE,
        payload={"userId": 1, "amount": 1},
        partitions=16,
        idempotency_scope=f"POST /v1/points/charge {job_id}",
        request_hash="x",
        deadline=past,
    )
    assert (keyed.created, replay.created, replay.job.id) == (True, False, keyed.job.id)
