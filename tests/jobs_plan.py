"""The hot job statements against 500,000 job rows in N time partitions, N = 4 .. 200.

    python -m shared.embedded up --run-dir .run/test -- python -m tests.jobs_plan [N ...]

For each N: a scratch database (migrated to head) with N partitions of ``jobs``
(``shared.retention``, as beat makes them), 500,000 finished jobs spread over them
and 200 PENDING jobs in the newest one, on 16 user queues.  Then, timed over many runs
on one connection (so psycopg's prepared statements and PostgreSQL's generic plans
come into play, as in the service), the very statements the service runs:
``GET /v1/jobs/{id}`` (``get_job_with_position``, for a finished and a PENDING job),
the drain's read of a queue's PENDING jobs (``lock_pending_batch``, 200, rolled back)
and the sweeper's ``stale_partitions``; and ``EXPLAIN (ANALYZE)`` of a read by id and of
the drain's read, with their planning time.  The question: do they get slower with
the number of partitions?
"""

from __future__ import annotations

import datetime as dt
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable

from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from shared.config import Settings, to_sqlalchemy_url
from shared.embedded import migrate
from shared.jobs import get_job_with_position, lock_pending_batch, stale_partitions
from shared.retention import JOBS, ensure_partitions, partitions_of
from tests.databases import scratch_database

ROWS = 500_000
PENDING = 200
WIDTH = 6 * 3600
QUEUES = 16

# A UUIDv7 of a moment ``t`` (timestamptz) with random bits, in SQL.
_UUID7 = (
    "(lpad(to_hex((extract(epoch FROM {t}) * 1000)::bigint), 12, '0') || '7'"
    " || substr(md5(random()::text), 1, 3) || '8' || substr(md5(random()::text), 1, 15))::uuid"
)


def _fill(session: Session, count: int, start: dt.datetime, end: dt.datetime) -> None:
    span = (end - start).total_seconds()
    session.execute(text("SET synchronous_commit = off"))
    t = f"(CAST(:start AS timestamptz) + make_interval(secs => g::float8 / {ROWS} * {span}))"
    session.execute(
        text(
            "INSERT INTO jobs (id, kind, partition, payload, status, result, created_at,"
            " finished_at)"
            f" SELECT {_UUID7.format(t=t)}, 'POINTS_CHARGE', 'user.' || g % {QUEUES},"
            " jsonb_build_object('userId', g, 'amount', 1), 'SUCCEEDED',"
            f" jsonb_build_object('userId', g, 'amount', 1), {t}, {t}"
            " FROM generate_series(1, :rows) g"
        ),
        {"start": start, "rows": count},
    )
    now = "now()"
    session.execute(
        text(
            "INSERT INTO jobs (id, kind, partition, payload)"
            f" SELECT {_UUID7.format(t=now)}, 'POINTS_CHARGE', 'user.' || g % {QUEUES},"
            " jsonb_build_object('userId', g, 'amount', 1) FROM generate_series(1, :n) g"
        ),
        {"n": PENDING},
    )
    session.commit()
    with session.get_bind().connect() as conn:  # type: ignore[union-attr]  # an Engine
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE jobs"))


def _timed(run: Callable[[], object], times: int) -> tuple[float, float]:
    """Median and p99 milliseconds of ``times`` runs (after 20 to warm up)."""
    for _ in range(20):
        run()
    took = []
    for _ in range(times):
        started = time.perf_counter()
        run()
        took.append((time.perf_counter() - started) * 1000)
    took.sort()
    return statistics.median(took), took[int(len(took) * 0.99) - 1]


def _explain(session: Session, sql: str, params: dict[str, object]) -> str:
    lines = session.execute(text(f"EXPLAIN (ANALYZE, COSTS OFF, SUMMARY ON) {sql}"), params)
    return "\n".join(f"    {line}" for line in lines.scalars())


def measure(server_url: str, partitions: int) -> None:
    name = f"jobs_plan_{partitions}_{uuid.uuid4().hex[:6]}"
    with scratch_database(server_url, name) as url:
        migrate(url)
        engine = create_engine(to_sqlalchemy_url(url))
        with Session(engine) as session:
            now = dt.datetime.now(dt.UTC)
            start = now - dt.timedelta(seconds=WIDTH * (partitions - 1))
            ensure_partitions(
                session,
                width_seconds=WIDTH,
                ahead=partitions,
                now_ms=int(start.timestamp() * 1000),
            )
            session.commit()
            made = len(partitions_of(session, JOBS))
            _fill(session, ROWS, start, now - dt.timedelta(minutes=1))
            ids = [
                uuid.UUID(str(r))
                for r in session.execute(
                    text("SELECT id FROM jobs TABLESAMPLE SYSTEM (1) LIMIT 500")
                ).scalars()
            ]
            pending = session.execute(
                text("SELECT id FROM jobs WHERE status = 'PENDING' LIMIT 1")
            ).scalar_one()
            session.commit()

            def by_id() -> object:
                return get_job_with_position(session, random.choice(ids))

            def pending_by_id() -> object:
                return get_job_with_position(session, pending)

            def drain_read() -> object:
                rows = lock_pending_batch(session, "user.3", 200)
                session.rollback()
                return rows

            def sweeper() -> object:
                return stale_partitions(session, dt.timedelta(seconds=5))

            print(f"\n== {made} partitions of jobs, {ROWS:,} finished + {PENDING} PENDING rows")
            for label, run in (
                ("GET /v1/jobs/{id} finished", by_id),
                ("GET /v1/jobs/{id} PENDING (position)", pending_by_id),
                ("drain read of user.3 (200, FOR UPDATE)", drain_read),
                ("sweeper stale_partitions", sweeper),
            ):
                p50, p99 = _timed(run, 500)
                session.rollback()
                print(f"  {label:<42} p50 {p50:6.3f} ms   p99 {p99:6.3f} ms")
            print("  EXPLAIN ANALYZE read by id:")
            print(_explain(session, "SELECT * FROM jobs WHERE id = :id", {"id": ids[0]}))
            print("  EXPLAIN ANALYZE drain read:")
            print(
                _explain(
                    session,
                    "SELECT * FROM jobs WHERE partition = 'user.3' AND status = 'PENDING'"
                    " ORDER BY seq LIMIT 200 FOR UPDATE",
                    {},
                )
            )
            session.rollback()
        engine.dispose()


def main(argv: list[str]) -> int:
    settings = Settings.from_env()
    for n in [int(a) for a in argv] or [4, 16, 64, 200]:
        measure(settings.database_url, n)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
