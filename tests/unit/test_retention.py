"""Data over time: jobs and outbox rows in time partitions, made ahead and dropped whole
past retention; a PENDING job is never dropped; Idempotency-Keys live as long as their
job (``shared.retention``)."""

from __future__ import annotations

import datetime as dt
import itertools
import time
import uuid
from typing import Any

import psycopg
import pytest
from alembic import command
from flask.testing import FlaskClient
from psycopg.errors import LockNotAvailable
from sqlalchemy import select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

import workers.points  # noqa: F401  (registers the points handler the drain applies)
from shared.embedded import alembic_config
from shared.jobs import JobKind, JobOutcome, fingerprint, finish_jobs, get_job, record
from shared.models import Job, JobIdempotencyKey
from shared.retention import (
    JOBS,
    OUTBOX,
    PARTITIONS_AHEAD,
    Dropped,
    drop_expired,
    ensure_partitions,
    id_floor,
    id_time,
    new_job_id,
    partition_name,
    partitions_of,
)
from tests.databases import scratch_database
from workers.base import Runtime, drain_partition
from workers.beat import keep_time_partitions

COUNT = 16
WIDTH = 60  # seconds: one partition a minute
MINUTE_MS = 60_000
# Moments far from the real clock, so only the partitions a test makes cover them.
LONG_AGO_MS = int(dt.datetime(2021, 3, 4, 10, 0, tzinfo=dt.UTC).timestamp() * 1000)
LATER_MS = int(dt.datetime(2091, 5, 17, 12, 0, tzinfo=dt.UTC).timestamp() * 1000)
RETENTION = dt.timedelta(hours=72)
_MARGIN_MS = 60_000  # a new partition starts at least this far ahead (a width of a day)
# Tests of jobs leave the outbox alone (its lock may be busy with another test's stack).
ONLY_JOBS = (JOBS,)


def _drop_expired(session: Session, **options: Any) -> Dropped:
    """``drop_expired`` as beat runs it: a parent whose lock stays busy past
    ``lock_timeout`` (the session's e2e stack reads jobs all the time) is left to the next
    run; here the next run comes at once, within a deadline."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with session.begin_nested():
                return drop_expired(session, **options)
        except OperationalError as exc:
            if not isinstance(exc.orig, LockNotAvailable) or time.monotonic() > deadline:
                raise


def _user() -> int:
    return uuid.uuid4().int % 10**15 + 1


def _charge(session: Session, user: int, at_ms: int, scope: str | None = None) -> Any:
    payload = {"userId": user, "amount": 100}
    return record(
        session,
        kind=JobKind.POINTS_CHARGE,
        payload=payload,
        partitions=COUNT,
        idempotency_scope=scope,
        request_hash=fingerprint("POST", "/v1/points/charge", payload) if scope else None,
        job_id=new_job_id(now_ms=at_ms),
    )


def _make_partitions(session: Session, start_ms: int) -> None:
    """Minute partitions from ``start_ms`` (a window) on, three of them, as beat makes
    them a minute ahead."""
    ensure_partitions(session, width_seconds=WIDTH, now_ms=start_ms - MINUTE_MS, ahead=4)


def _holder(session: Session, job_id: uuid.UUID) -> str:
    return str(
        session.execute(
            text("SELECT tableoid::regclass::text FROM jobs WHERE id = :id"), {"id": job_id}
        ).scalar_one()
    )


def _finish(session: Session, job_id: uuid.UUID, at: dt.datetime) -> None:
    job = get_job(session, job_id)
    assert job is not None
    finish_jobs(session, [JobOutcome.succeeded(job, {"ok": True}, at)])


def test_job_ids_are_uuid7_and_carry_their_time() -> None:
    job_id = new_job_id(now_ms=LONG_AGO_MS + 123)
    assert (job_id.version, job_id.variant) == (7, uuid.RFC_4122)
    assert id_time(job_id) == dt.datetime.fromtimestamp((LONG_AGO_MS + 123) / 1000, dt.UTC)
    assert id_floor(LONG_AGO_MS) < job_id < id_floor(LONG_AGO_MS + 124)
    assert len({new_job_id(now_ms=LONG_AGO_MS) for _ in range(1000)}) == 1000


def test_partitions_are_made_ahead_once_and_rows_go_to_theirs(db_session: Session) -> None:
    created = ensure_partitions(db_session, width_seconds=WIDTH, now_ms=LATER_MS + 5_000)
    # Not the current window (rows may be on their way into the default partition): a
    # partial one from half a width ahead, then whole ones.
    assert sorted(created) == sorted(
        partition_name(t, at)
        for t in ("jobs", "outbox")
        for at in (LATER_MS + 35_000, LATER_MS + MINUTE_MS, LATER_MS + 2 * MINUTE_MS)
    )
    assert ensure_partitions(db_session, width_seconds=WIDTH, now_ms=LATER_MS + 5_000) == []
    # A wider setting later applies from the first gap on; ranges never overlap.
    wider = ensure_partitions(db_session, width_seconds=4 * WIDTH, now_ms=LATER_MS + 5_000)
    assert wider
    assert any(
        p.covers(LATER_MS + 5_000 + PARTITIONS_AHEAD * 4 * MINUTE_MS - 1)
        for p in partitions_of(db_session, JOBS)
    )
    bounds = [(p.lower_ms, p.upper_ms) for p in partitions_of(db_session, JOBS)]
    assert all(hi <= next_lo for (_, hi), (next_lo, _) in itertools.pairwise(bounds))
    job = _charge(db_session, _user(), LATER_MS + MINUTE_MS + 7).job
    assert _holder(db_session, job.id) == partition_name("jobs", LATER_MS + MINUTE_MS)
    now_job = _charge(db_session, _user(), LATER_MS + 6_000).job
    assert _holder(db_session, now_job.id) == "jobs_default"


def test_rows_written_before_their_partition_move_into_it(db_session: Session) -> None:
    job = _charge(db_session, _user(), LATER_MS + MINUTE_MS + 30_000).job
    assert _holder(db_session, job.id) == "jobs_default"
    ensure_partitions(db_session, width_seconds=WIDTH, now_ms=LATER_MS)
    assert _holder(db_session, job.id) == partition_name("jobs", LATER_MS + MINUTE_MS)


def test_finished_partitions_past_retention_are_dropped_with_their_keys(
    db_session: Session,
) -> None:
    _make_partitions(db_session, LONG_AGO_MS)
    scope = f"POST /v1/points/charge {uuid.uuid4()}"
    old = _charge(db_session, _user(), LONG_AGO_MS + 10, scope).job
    _finish(db_session, old.id, dt.datetime.fromtimestamp(LONG_AGO_MS / 1000 + 30, dt.UTC))
    first = partition_name("jobs", LONG_AGO_MS)

    # The last moment it must still be kept: the partition's end plus the retention.
    at_edge = LONG_AGO_MS + MINUTE_MS + int(RETENTION.total_seconds() * 1000) - 1
    assert (
        first
        not in _drop_expired(
            db_session, retention=RETENTION, now_ms=at_edge, tables=ONLY_JOBS
        ).dropped
    )
    assert get_job(db_session, old.id) is not None

    outcome = _drop_expired(db_session, retention=RETENTION, now_ms=at_edge + 2, tables=ONLY_JOBS)
    assert first in outcome.dropped
    assert get_job(db_session, old.id) is None
    assert db_session.get(JobIdempotencyKey, scope) is None
    # The key is free again: a new job, not a replay.
    again = _charge(db_session, _user(), LATER_MS, scope)
    assert again.created


def test_a_late_finish_keeps_its_partition_for_the_retention_after_it(
    db_session: Session,
) -> None:
    _make_partitions(db_session, LONG_AGO_MS)
    job = _charge(db_session, _user(), LONG_AGO_MS + 10).job
    finished = dt.datetime.fromtimestamp(LONG_AGO_MS / 1000, dt.UTC) + dt.timedelta(days=30)
    _finish(db_session, job.id, finished)
    name = partition_name("jobs", LONG_AGO_MS)
    just_before = int((finished + RETENTION).timestamp() * 1000) - 1_000
    assert (
        name
        in _drop_expired(
            db_session, retention=RETENTION, now_ms=just_before, tables=ONLY_JOBS
        ).waiting
    )
    assert get_job(db_session, job.id) is not None
    after = just_before + 2_000
    assert (
        name
        in _drop_expired(db_session, retention=RETENTION, now_ms=after, tables=ONLY_JOBS).dropped
    )


def test_a_pending_job_older_than_any_retention_is_kept_applied_and_read(
    runtime: Runtime, client: FlaskClient
) -> None:
    user = _user()
    with runtime.session_factory() as session, session.begin():
        _make_partitions(session, LONG_AGO_MS)
        pending = _charge(session, user, LONG_AGO_MS + 10).job
        finished = _charge(session, _user(), LONG_AGO_MS + MINUTE_MS + 10).job
        _finish(session, finished.id, dt.datetime.fromtimestamp(LONG_AGO_MS / 1000 + 90, dt.UTC))
        session.execute(
            update(Job)
            .where(Job.id == pending.id)
            .values(created_at=dt.datetime.fromtimestamp(LONG_AGO_MS / 1000, dt.UTC))
        )
    # Years past every retention: the finished job's partition goes, the PENDING one's stays.
    with runtime.session_factory() as session, session.begin():
        outcome = _drop_expired(session, retention=RETENTION, tables=ONLY_JOBS)
    assert partition_name("jobs", LONG_AGO_MS) in outcome.held
    assert partition_name("jobs", LONG_AGO_MS + MINUTE_MS) in outcome.dropped
    assert client.get(f"/v1/jobs/{finished.id}").status_code == 404
    body = client.get(f"/v1/jobs/{pending.id}").get_json()
    assert body["status"] == "PENDING"

    assert drain_partition(runtime, pending.partition) >= 1
    body = client.get(f"/v1/jobs/{pending.id}").get_json()
    assert (body["status"], body["result"]) == ("SUCCEEDED", {"userId": user, "amount": 100})
    # Finished now: kept for the retention after its finish, then gone.
    with runtime.session_factory() as session, session.begin():
        assert (
            partition_name("jobs", LONG_AGO_MS)
            in _drop_expired(session, retention=RETENTION, tables=ONLY_JOBS).waiting
        )
    later = int((dt.datetime.now(dt.UTC) + RETENTION).timestamp() * 1000) + MINUTE_MS
    with runtime.session_factory() as session, session.begin():
        outcome = _drop_expired(session, retention=RETENTION, now_ms=later, tables=ONLY_JOBS)
    assert partition_name("jobs", LONG_AGO_MS) in outcome.dropped
    assert client.get(f"/v1/jobs/{pending.id}").status_code == 404


def test_an_idempotency_key_replays_across_partition_boundaries(
    db_session: Session, client: FlaskClient
) -> None:
    _make_partitions(db_session, LATER_MS)
    scope = f"POST /v1/points/charge {uuid.uuid4()}"
    user = _user()
    first = _charge(db_session, user, LATER_MS + 10, scope)
    # Accepted again three partitions later (the new request's id is in a later one).
    replay = _charge(db_session, user, LATER_MS + 3 * MINUTE_MS + 10, scope)
    assert first.created
    assert not replay.created
    assert replay.job.id == first.job.id
    assert _holder(db_session, first.job.id) == partition_name("jobs", LATER_MS)
    # Through HTTP on the live partitions: the same key gives the same job, then 422
    # with other input.
    key = {"Idempotency-Key": f"retention-{uuid.uuid4()}"}
    body = {"userId": user, "amount": 7}
    one = client.post("/v1/points/charge", json=body, headers=key)
    two = client.post("/v1/points/charge", json=body, headers=key)
    assert one.status_code == two.status_code == 202
    assert one.get_json()["jobId"] == two.get_json()["jobId"]
    assert uuid.UUID(one.get_json()["jobId"]).version == 7
    other = client.post("/v1/points/charge", json=body | {"amount": 8}, headers=key)
    assert other.status_code == 422


def test_outbox_partitions_go_only_once_delivered_and_past_retention(
    db_session: Session,
) -> None:
    _make_partitions(db_session, LONG_AGO_MS)
    at = dt.datetime.fromtimestamp(LONG_AGO_MS / 1000 + 5, dt.UTC)
    db_session.execute(
        text(
            "INSERT INTO outbox (order_id, status, created_at, delivered_at)"
            " VALUES (1, 'READY', :at, :at), (2, 'READY', :later, NULL)"
        ),
        {"at": at, "later": at + dt.timedelta(minutes=1)},
    )
    outcome = _drop_expired(db_session, retention=RETENTION)
    assert partition_name("outbox", LONG_AGO_MS) in outcome.dropped
    assert partition_name("outbox", LONG_AGO_MS + MINUTE_MS) in outcome.held
    names = [p.name for p in partitions_of(db_session, OUTBOX)]
    assert partition_name("outbox", LONG_AGO_MS) not in names


def test_beat_makes_partitions_ahead_and_drops_old_ones(runtime: Runtime) -> None:
    with runtime.session_factory() as session, session.begin():
        _make_partitions(session, LONG_AGO_MS)
    outcome = keep_time_partitions(runtime)
    width = runtime.settings.job_partition_seconds * 1000
    now_ms = dt.datetime.now(dt.UTC).timestamp() * 1000
    with runtime.session_factory() as session:
        jobs = partitions_of(session, JOBS)
    assert any(p.covers(now_ms + 2 * _MARGIN_MS) for p in jobs)
    assert any(p.covers(now_ms + PARTITIONS_AHEAD * width - 1) for p in jobs)
    dropped = set(outcome["dropped"])
    # A table whose lock is busy past lock_timeout (another test's stack reading the
    # outbox) is left to the next run, as beat's next run would: run it again, within
    # a deadline.
    deadline = time.monotonic() + 30
    wanted = {partition_name("jobs", LONG_AGO_MS), partition_name("outbox", LONG_AGO_MS)}
    while not wanted <= dropped and time.monotonic() < deadline:
        dropped |= set(keep_time_partitions(runtime)["dropped"])
    assert wanted <= dropped
    assert keep_time_partitions(runtime)["created"] == []


# ---- the migration converts tables that hold rows ------------------------------------------

PREVIOUS = "5c3e9a7d2b14"  # the revision before this one


def _snapshot(conn: psycopg.Connection[tuple[object, ...]]) -> tuple[object, ...]:
    jobs = conn.execute("SELECT * FROM jobs ORDER BY seq").fetchall()
    outbox = conn.execute("SELECT * FROM outbox ORDER BY id").fetchall()
    return jobs, outbox


def test_the_migration_converts_jobs_and_outbox_with_their_rows_and_back(
    server_urls: tuple[str, str],
) -> None:
    with scratch_database(server_urls[0], f"retain_{uuid.uuid4().hex[:8]}") as url:
        command.upgrade(alembic_config(url), PREVIOUS)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO jobs (id, kind, partition, payload, status, idempotency_key,"
                " request_hash, finished_at)"
                " SELECT gen_random_uuid(), 'POINTS_CHARGE', 'user.' || g % 4, '{}',"
                " CASE WHEN g % 3 = 0 THEN 'PENDING' ELSE 'SUCCEEDED' END,"
                " CASE WHEN g % 2 = 0 THEN 'key ' || g END, 'h',"
                " CASE WHEN g % 3 <> 0 THEN now() END FROM generate_series(1, 12) g"
            )
            conn.execute(
                "INSERT INTO outbox (order_id, status, created_at, delivered_at)"
                " SELECT g, 'READY', now() - (g || ' days')::interval, now()"
                " FROM generate_series(1, 5) g"
            )
            before = _snapshot(conn)
        command.upgrade(alembic_config(url), "head")
        with psycopg.connect(url, autocommit=True) as conn:
            assert _snapshot(conn) == before
            assert conn.execute("SELECT count(*) FROM jobs_default").fetchone() == (12,)
            assert conn.execute("SELECT count(*) FROM outbox_p00000000000000").fetchone() == (5,)
            assert conn.execute("SELECT count(*) FROM job_idempotency_keys").fetchone() == (6,)
            ahead = conn.execute(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = 'jobs'::regclass"
            ).fetchone()
            assert ahead is not None
            assert ahead[0] >= 17
            seq = conn.execute(
                "INSERT INTO jobs (id, kind, partition, payload) VALUES"
                " (gen_random_uuid(), 'POINTS_CHARGE', 'user.1', '{}') RETURNING seq"
            ).fetchone()
            assert seq == (13,)  # the sequence went on
            outbox_id = conn.execute(
                "INSERT INTO outbox (order_id, status) VALUES (9, 'READY') RETURNING id"
            ).fetchone()
            assert outbox_id == (6,)
            conn.execute("DELETE FROM jobs WHERE seq = 13")
            conn.execute("DELETE FROM outbox WHERE id = 6")
        command.downgrade(alembic_config(url), PREVIOUS)
        with psycopg.connect(url, autocommit=True) as conn:
            assert _snapshot(conn) == before
        command.upgrade(alembic_config(url), "head")


def test_every_job_read_by_id_touches_one_partition(db_session: Session) -> None:
    _make_partitions(db_session, LATER_MS)
    job = _charge(db_session, _user(), LATER_MS + 10).job
    plan = "\n".join(
        db_session.execute(
            text("EXPLAIN (ANALYZE, COSTS OFF) SELECT * FROM jobs WHERE id = :id"),
            {"id": job.id},
        ).scalars()
    )
    scanned = [line for line in plan.splitlines() if "Scan" in line]
    assert len(scanned) == 1, plan
    assert partition_name("jobs", LATER_MS) in scanned[0]
    assert db_session.execute(select(Job.id).where(Job.id == job.id)).scalar_one() == job.id


@pytest.mark.parametrize("hours", [0.05, 24])
def test_short_retention_only_outside_production(hours: float) -> None:
    from shared.config import AppEnv, ConfigError, Settings

    assert Settings(database_url="x", job_retention_hours=hours).job_retention_hours == hours
    with pytest.raises(ConfigError, match="JOB_RETENTION_HOURS") if hours < 24 else _nothing():
        Settings(
            database_url="x",
            app_env=AppEnv.PRODUCTION,
            admin_token="t",
            auth_mode="none",
            job_retention_hours=hours,
        )


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None
