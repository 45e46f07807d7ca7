"""Data over time: time partitions of ``jobs`` and ``outbox``, made ahead and dropped whole.

ARCHITECTURE rule 7: a finished job is kept at least ``JOB_RETENTION_HOURS`` after it
finished (API.md), then goes without row-by-row DELETE churn; a PENDING job is never
removed.  Delivered outbox rows are kept as long.

* ``jobs`` is partitioned by range of its id.  Job ids are UUIDv7 (``new_job_id``):
  the first 48 bits are the Unix time in milliseconds, so a range of ids is a range of
  time and ``GET /v1/jobs/{id}`` reads one partition (pruned by the id itself).
* ``outbox`` is partitioned by range of ``created_at``.
* Partitions are ``JOB_PARTITION_SECONDS`` wide, aligned on multiples of that width
  since the epoch, named ``<table>_pYYYYMMDDHHMMSS`` after their lower bound (UTC),
  and made up to ``PARTITIONS_AHEAD`` widths ahead by beat (``ensure_partitions``;
  never a range rows are already being routed into).  Each
  table also has ``<table>_default`` for a row no partition covers (a job id that is
  not time-ordered, such as the UUIDv4 ids of jobs accepted before this release, or a
  row written while beat was away): nothing is ever refused for want of a partition.
* ``drop_expired`` drops a partition once its upper bound and the newest
  ``finished_at`` (``delivered_at``) in it are both older than the retention and it
  holds no PENDING job (undelivered outbox row); the drop itself holds the parent's
  ACCESS EXCLUSIVE lock for milliseconds (see ``drop_expired``).  A partition held
  back by a PENDING row is logged and counted on every run, never dropped.
  With a job partition go its Idempotency-Keys (``job_idempotency_keys`` rows whose
  job id is in its range): a key lives exactly as long as its job, which is at least
  24 hours in production (the floor of ``JOB_RETENTION_HOURS``).
* The default partitions are emptied of rows past retention with small DELETE batches
  (``purge_defaults``): they only ever hold the rows of before this release and
  strays, so this churn is transitional and small.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import re
import time
import uuid
from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

# Partitions made ahead of the clock (beside the current one), so a row never waits
# for beat; few, since every partition costs the reads that cannot prune a little.
PARTITIONS_AHEAD = 2
# Two beats (or a beat and an operator) changing the partitions take turns.
_LOCK_ID = 0x5E0B_0017
# DDL gives up rather than queue (and queue every reader behind it) for long; the next
# run retries.  While a DROP or ATTACH waits for its lock, the statements that need the
# table wait behind it: this bounds that stall.
_LOCK_TIMEOUT = "500ms"
_NAME = re.compile(r"^(jobs|outbox)_p[0-9]{14}$")
# Rows of a default partition deleted per statement.
DEFAULT_PURGE_BATCH = 5_000


def new_job_id(now_ms: int | None = None) -> uuid.UUID:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, version 7, 74 random bits.

    Time-ordered, so a job's id says which partition holds it.  Ids made within one
    millisecond are not ordered among themselves; nothing needs them to be (``seq``
    is the commit order).
    """
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    rand = int.from_bytes(os.urandom(10), "big")
    rand_a = (rand >> 62) & 0xFFF
    rand_b = rand & ((1 << 62) - 1)
    return uuid.UUID(
        int=(ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    )


def id_floor(moment_ms: int) -> uuid.UUID:
    """The smallest id of millisecond ``moment_ms``: a partition bound of ``jobs``."""
    return uuid.UUID(int=(moment_ms & 0xFFFF_FFFF_FFFF) << 80)


def id_time(job_id: uuid.UUID) -> dt.datetime:
    """When a UUIDv7 was made (for other ids, a meaningless moment)."""
    return dt.datetime.fromtimestamp((job_id.int >> 80) / 1000, dt.UTC)


@dataclass(frozen=True)
class PartitionedTable:
    name: str
    # SQL turning a bound literal (text ``b``) into epoch milliseconds.
    bound_ms_sql: str
    # A row that must never be dropped, and the moment a row finished.
    open_rows: str
    finished_at: str

    def literal(self, ms: int) -> str:
        if self.name == "jobs":
            return f"'{id_floor(ms)}'"
        moment = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
        return f"'{moment.isoformat()}'"


JOBS = PartitionedTable(
    "jobs",
    "('x' || substr(replace(b, '-', ''), 1, 12))::bit(48)::bigint",
    "status = 'PENDING'",
    "finished_at",
)
OUTBOX = PartitionedTable(
    "outbox",
    "(extract(epoch FROM CAST(b AS timestamptz)) * 1000)::bigint",
    "delivered_at IS NULL",
    "delivered_at",
)
TABLES = (JOBS, OUTBOX)

# A partition's autovacuum: each job row is updated once (PENDING -> finished) and that
# update cannot be HOT (``status`` is in the predicate of the PENDING index), so every
# job leaves one dead tuple.  Vacuum the partition being written after 5 % of it is
# dead (not the default 20 %), so its dead tuples stay a small share; not after a fixed
# small number, because each vacuum also scans the partition's whole primary key.  Old
# partitions are dropped with their dead tuples, never vacuumed again.  (The small
# PENDING index mostly cleans itself: the drain's index scans mark finished entries
# dead and a page split removes them.)
STORAGE = (
    "autovacuum_vacuum_scale_factor = 0.05, autovacuum_vacuum_threshold = 10000,"
    " autovacuum_vacuum_insert_scale_factor = 0.05, autovacuum_analyze_scale_factor = 0.02"
)


@dataclass(frozen=True)
class Partition:
    table: str
    name: str
    lower_ms: float  # -inf for FROM (MINVALUE)
    upper_ms: float

    def covers(self, ms: float) -> bool:
        return self.lower_ms <= ms < self.upper_ms


def partitions_of(session: Session, table: PartitionedTable) -> list[Partition]:
    """The range partitions of ``table`` (not its default one), by lower bound."""
    rows = session.execute(
        text(
            f"""
            SELECT c.relname,
                   CASE WHEN m[1] = 'MINVALUE' THEN NULL
                        ELSE (SELECT {table.bound_ms_sql} FROM (SELECT trim('''' FROM m[1]) AS b) x)
                   END,
                   (SELECT {table.bound_ms_sql} FROM (SELECT trim('''' FROM m[2]) AS b) y)
            FROM pg_inherits i
            JOIN pg_class c ON c.oid = i.inhrelid
            CROSS JOIN LATERAL regexp_match(
                pg_get_expr(c.relpartbound, c.oid), 'FROM \\((.*)\\) TO \\((.*)\\)') AS m
            WHERE i.inhparent = CAST(:table AS regclass) AND m IS NOT NULL
            """  # noqa: S608 (the table's own SQL, no input)
        ),
        {"table": table.name},
    ).all()
    found = [
        Partition(
            table.name,
            name,
            -math.inf if lower is None else float(lower),
            float(upper),
        )
        for name, lower, upper in rows
    ]
    return sorted(found, key=lambda p: p.lower_ms)


def _begin_maintenance(session: Session) -> int:
    """Take turns with other maintainers; returns the database's clock in epoch ms."""
    session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
    session.execute(text(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'"))
    return int(session.execute(text("SELECT extract(epoch FROM now()) * 1000")).scalar_one())


def ensure_partitions(
    session: Session,
    *,
    width_seconds: int,
    ahead: int = PARTITIONS_AHEAD,
    now_ms: int | None = None,
) -> list[str]:
    """Create the partitions of ``jobs`` and ``outbox`` up to ``ahead`` widths ahead,
    where missing; returns the names created.

    Only ranges that start at least ``_margin_ms`` in the future: rows being written
    now may be on their way into the default partition (a fresh database, beat away),
    and an ATTACH of the range they belong to would make those inserts fail the default
    partition's new constraint (they were routed before it).  So where the current
    window has no partition, the first one made starts ``_margin_ms`` from now (a
    partial window) and the rows of that gap stay in the default partition.  In the
    steady state each window is made a width or more before it starts.

    Ranges already there are kept whatever their width (a changed
    ``JOB_PARTITION_SECONDS`` applies from the first gap on).  A partition is made as
    a plain table and then attached: ATTACH takes only a SHARE UPDATE EXCLUSIVE lock
    on the parent, so inserts and reads go on meanwhile.
    """
    db_now = _begin_maintenance(session)
    now = db_now if now_ms is None else now_ms
    width = width_seconds * 1000
    created: list[str] = []
    for table in TABLES:
        existing = partitions_of(session, table)
        cursor = float(math.ceil((now + _margin_ms(width)) / 1000) * 1000)
        end = now + ahead * width
        while cursor < end:
            covering = next((p for p in existing if p.covers(cursor)), None)
            if covering is not None:
                cursor = covering.upper_ms
                continue
            upper = min(
                [cursor - cursor % width + width]
                + [p.lower_ms for p in existing if p.lower_ms > cursor]
            )
            made = _create(session, table, int(cursor), int(upper))
            existing.append(made)
            created.append(made.name)
            cursor = upper
    return created


def _margin_ms(width: float) -> float:
    """How far ahead of now a new partition must start (``ensure_partitions``)."""
    return min(60_000.0, width / 2)


def partition_name(table: str, lower_ms: int) -> str:
    moment = dt.datetime.fromtimestamp(lower_ms / 1000, dt.UTC)
    return f"{table}_p{moment:%Y%m%d%H%M%S}"


def _create(session: Session, table: PartitionedTable, lower: int, upper: int) -> Partition:
    name = partition_name(table.name, lower)
    if not _NAME.match(name):
        raise ValueError(f"unexpected partition name {name!r}")
    lo, hi = table.literal(lower), table.literal(upper)
    key = "id" if table is JOBS else "created_at"
    session.execute(
        text(
            f"CREATE TABLE {name} (LIKE {table.name} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
            f" WITH ({STORAGE})"
        )
    )
    # Rows of this range that went to the default partition before it existed.
    session.execute(
        text(
            f"WITH moved AS (DELETE FROM {table.name}_default"  # noqa: S608 (names checked)
            f" WHERE {key} >= {lo} AND {key} < {hi} RETURNING *)"
            f" INSERT INTO {name} SELECT * FROM moved"
        )
    )
    session.execute(
        text(f"ALTER TABLE {table.name} ATTACH PARTITION {name} FOR VALUES FROM ({lo}) TO ({hi})")
    )
    return Partition(table.name, name, lower, upper)


@dataclass(frozen=True)
class Dropped:
    dropped: list[str]
    # Partitions past retention kept because of a PENDING job / undelivered row.
    held: list[str]
    # Past retention but with a row finished too recently: dropped on a later run.
    waiting: list[str]
    # Per table: how long its parent's ACCESS EXCLUSIVE lock was waited for and held
    # (until the drops were done; the commit follows at once).
    locked_ms: dict[str, float] = field(default_factory=dict)


def drop_expired(
    session: Session,
    *,
    retention: dt.timedelta,
    now_ms: int | None = None,
    tables: tuple[PartitionedTable, ...] = TABLES,
) -> Dropped:
    """Drop every partition of ``tables`` wholly past ``retention``.

    A partition goes when its upper bound is older than the retention, it holds no
    PENDING job (undelivered outbox row) and its newest finish is older than the
    retention.  With a job partition go the Idempotency-Keys of its jobs.

    Locks are taken as every query takes them, parent before partition, or a drop
    would deadlock with the reads (a DROP of a partition takes ACCESS EXCLUSIVE on the
    parent too).  The checks run first, without a strong lock: a partition with no
    PENDING row can gain no newly finished row (a finished job never changes again,
    and new ids are of later partitions), so under the parent's lock only the cheap
    check that no PENDING row arrived is repeated.  The keys go before that lock (a
    replay meanwhile makes a new job: the old one is past retention, so older than 24
    hours), so the parent is held for the DROP alone: milliseconds, and at most
    ``lock_timeout`` of waiting for it.
    """
    db_now = _begin_maintenance(session)
    now = db_now if now_ms is None else now_ms
    cutoff = now - retention.total_seconds() * 1000
    cutoff_at = dt.datetime.fromtimestamp(cutoff / 1000, dt.UTC)
    result = Dropped([], [], [])
    for table in tables:
        due: list[Partition] = []
        for part in partitions_of(session, table):
            if part.upper_ms > cutoff:
                continue
            if _has_open_row(session, table, part):
                result.held.append(part.name)
                continue
            newest = session.execute(
                text(f"SELECT max({table.finished_at}) FROM {part.name}")  # noqa: S608
            ).scalar_one()
            if newest is not None and newest >= cutoff_at:
                result.waiting.append(part.name)
                continue
            due.append(part)
        if not due:
            continue
        if table is JOBS:
            for part in due:
                lower = (
                    uuid.UUID(int=0) if part.lower_ms == -math.inf else id_floor(int(part.lower_ms))
                )
                session.execute(
                    text(
                        "DELETE FROM job_idempotency_keys"
                        " WHERE job_id >= :lower AND job_id < :upper"
                    ),
                    {"lower": lower, "upper": id_floor(int(part.upper_ms))},
                )
        started = time.monotonic()
        session.execute(text(f"LOCK TABLE ONLY {table.name} IN ACCESS EXCLUSIVE MODE"))
        for part in due:
            if _has_open_row(session, table, part):  # written since the check: keep it
                result.held.append(part.name)
                continue
            session.execute(text(f"DROP TABLE {part.name}"))
            result.dropped.append(part.name)
        result.locked_ms[table.name] = round((time.monotonic() - started) * 1000, 1)
    if result.held:
        log.warning(
            "partitions past retention kept for a PENDING job or undelivered outbox row: %s",
            result.held,
        )
    return result


def _has_open_row(session: Session, table: PartitionedTable, part: Partition) -> bool:
    return bool(
        session.execute(
            text(f"SELECT EXISTS (SELECT 1 FROM {part.name} WHERE {table.open_rows})")  # noqa: S608
        ).scalar_one()
    )


def purge_defaults(
    session: Session, *, retention: dt.timedelta, batch: int = DEFAULT_PURGE_BATCH
) -> int:
    """Delete one batch of rows past retention from each default partition; returns
    how many went (jobs and their keys, delivered outbox rows)."""
    cutoff = {"retention": retention, "batch": batch}
    jobs = session.execute(
        text(
            """
            WITH gone AS (
                DELETE FROM jobs_default WHERE id IN (
                    SELECT id FROM jobs_default
                    WHERE status <> 'PENDING' AND finished_at < now() - :retention
                    LIMIT :batch)
                RETURNING id
            ), keys AS (
                DELETE FROM job_idempotency_keys WHERE job_id IN (SELECT id FROM gone)
            )
            SELECT count(*) FROM gone
            """
        ),
        cutoff,
    ).scalar_one()
    outbox = session.execute(
        text(
            """
            WITH gone AS (
                DELETE FROM outbox_default WHERE id IN (
                    SELECT id FROM outbox_default WHERE delivered_at < now() - :retention
                    LIMIT :batch)
                RETURNING id
            )
            SELECT count(*) FROM gone
            """
        ),
        cutoff,
    ).scalar_one()
    return int(jobs) + int(outbox)
