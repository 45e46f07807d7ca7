"""The job record: how an accepted mutation is stored, routed and finished.

A job row is the truth (ARCHITECTURE rule 3).  The broker carries only a wake-up
for a partition queue; its consumer reads that partition's PENDING rows in the
order they were committed, so a lost, duplicated or late message changes nothing.
"""

from __future__ import annotations

import datetime as dt
import enum
import functools
import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import redis
from sqlalchemy import (
    Connection,
    DateTime,
    Insert,
    Row,
    String,
    Table,
    TextClause,
    bindparam,
    case,
    column,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID, insert
from sqlalchemy.orm import Session

from shared.domain.batch_rows import any_of
from shared.domain.errors import ErrorCode
from shared.formats import rfc3339
from shared.models import Job, JobIdempotencyKey
from shared.partitions import HISTORY_QUEUE, PartitionKind, partition
from shared.retention import new_job_id


class JobKind(enum.StrEnum):
    POINTS_CHARGE = "POINTS_CHARGE"
    POINTS_USE = "POINTS_USE"
    STOCK_SET = "STOCK_SET"
    ORDER_CREATE = "ORDER_CREATE"
    COUPON_ISSUE = "COUPON_ISSUE"
    ORDER_PAY = "ORDER_PAY"


class JobStatus(enum.StrEnum):
    PENDING = "PENDING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


# Task names cross the process boundary: web and the sweeper send by name.
DRAIN_TASK = "jobs.drain"
HISTORY_TASK = "history.drain"

# Redis (broker db) names shared by web and workers.  A job's outcome is published to
# the channels of the web processes waiting for it, not broadcast: its row's
# ``reply_to`` (the process that accepted it with ``Prefer: wait``) and the members of
# ``waiters:<job id>`` (processes holding a long poll on it).
FINISHED_CHANNEL_PREFIX = "jobs:finished:"


def waiters_key(job_id: str) -> str:
    """The set of channels of web processes long-polling ``job_id``."""
    return f"waiters:{job_id}"


def task_for_queue(queue: str) -> str:
    """The task that drains ``queue``."""
    return HISTORY_TASK if queue == HISTORY_QUEUE else DRAIN_TASK


# A wake-up flag lives this long at most: a flag whose message was lost, or whose
# drainer died, stops suppressing wake-ups after it (the sweeper also re-sends).
WAKE_FLAG_SECONDS = 10


def wake_partition(flags: redis.Redis, queue: str, send: Callable[[str], None]) -> bool:
    """Send a wake-up for ``queue`` with ``send`` unless one is in flight; True if sent.

    One wake-up in flight per partition: a burst of jobs costs one message.  The
    flag is set first and removed again if the send fails, so a later job retries.
    Never call inside an open transaction (commit first, then send).
    """
    if not flags.set(wake_key(queue), 1, nx=True, ex=WAKE_FLAG_SECONDS):
        return False
    try:
        send(queue)
    except Exception:
        flags.delete(wake_key(queue))
        raise
    return True


def wake_key(queue: str) -> str:
    """Set while a wake-up for ``queue``'s kind is in flight, so bursts send one message,
    not N.  One flag per partition kind (``wake:product``), not per partition: a drain
    takes every partition of its kind that has PENDING jobs (``lock_pending_batch``), so
    one wake-up serves them all and batches follow what is in flight (rule 6)."""
    return f"wake:{queue.partition('.')[0]}"


PARTITION_KIND_OF: dict[JobKind, PartitionKind] = {
    JobKind.POINTS_CHARGE: PartitionKind.USER,
    JobKind.POINTS_USE: PartitionKind.USER,
    JobKind.STOCK_SET: PartitionKind.PRODUCT,
    JobKind.ORDER_CREATE: PartitionKind.PRODUCT,
    JobKind.COUPON_ISSUE: PartitionKind.COUPON,
    # The paying user's partition: decided in order with that user's charges and uses.
    JobKind.ORDER_PAY: PartitionKind.USER,
}


def routing_key(kind: JobKind, payload: dict[str, Any]) -> int:
    """The resource whose partition applies this job."""
    if kind in (JobKind.POINTS_CHARGE, JobKind.POINTS_USE, JobKind.ORDER_PAY):
        return int(payload["userId"])
    if kind is JobKind.STOCK_SET:
        return int(payload["productId"])
    if kind is JobKind.ORDER_CREATE:
        # The smallest product id: the first row the order locks (rule 1).
        return min(int(line["productId"]) for line in payload["orderLines"])
    return int(payload["couponId"])


def partition_for_job(kind: JobKind, payload: dict[str, Any], count: int) -> str:
    return partition(PARTITION_KIND_OF[kind], routing_key(kind, payload), count)


def fingerprint(method: str, path: str, payload: dict[str, Any]) -> str:
    """A canonical hash of the validated input, for Idempotency-Key reuse checks."""
    canonical = json.dumps([method, path, payload], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


_jobs = cast(Table, Job.__table__)
_keys = cast(Table, JobIdempotencyKey.__table__)
# Each job INSERT carries its writer's deadline: a server that receives the statement
# later (it was frozen, or cut off, with the statement in its socket buffer or in
# retransmission) writes nothing, so a request that gave up waiting and answered 503
# never gets a row after all (API.md: a 503 only when no job row was committed).
# statement_timestamp() is when the server received the statement: one value for all
# of its rows.
NO_DEADLINE = dt.datetime(9999, 1, 1, tzinfo=dt.UTC)
_SELECT = select(*_jobs.c)


@functools.lru_cache(maxsize=16)
def _insert_once(columns: tuple[str, ...]) -> Insert:
    """The job row of ``columns`` (bound by name), written only if its Idempotency-Key
    was not taken: one statement.

    The key's uniqueness across the time partitions of ``jobs`` is the primary key of
    ``job_idempotency_keys``: its ``ON CONFLICT DO NOTHING`` waits for a concurrent
    writer of the same key, and when the key is taken no job row is written.  Only
    what the server makes comes back; the rest of a new row is what the caller gave.
    """
    key = (
        insert(_keys)
        .from_select(
            ["key", "job_id"],
            select(
                bindparam("idempotency_key", type_=_keys.c.key.type),
                bindparam("id", type_=_keys.c.job_id.type),
            ).where(
                func.statement_timestamp() < bindparam("deadline", type_=DateTime(timezone=True))
            ),
        )
        .on_conflict_do_nothing(index_elements=["key"])
        .returning(_keys.c.job_id)
        .cte("key")
    )
    values = select(*(bindparam(c, type_=_jobs.c[c].type) for c in columns)).select_from(key)
    return (
        insert(_jobs).from_select(list(columns), values).returning(_jobs.c.seq, _jobs.c.created_at)
    )


_KEYED_JOB = _SELECT.where(
    _jobs.c.id == select(_keys.c.job_id).where(_keys.c.key == bindparam("key")).scalar_subquery()
)

# ``position.ahead`` is exact up to this many jobs (API.md), then this number.
POSITION_CAP = 10_000

# A session or a bare connection: the accept path runs on either.
Executor = Session | Connection


@dataclass(frozen=True)
class JobRecord:
    """A job row as read or written (a plain value: no ORM identity map behind it)."""

    id: uuid.UUID
    seq: int
    kind: str
    partition: str
    payload: dict[str, Any]
    status: str
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    attempts: int
    idempotency_key: str | None
    request_hash: str | None
    created_at: dt.datetime
    finished_at: dt.datetime | None
    # The channel of the web process that accepted the job with ``Prefer: wait`` and
    # waits for its outcome (None: nobody waited when it was accepted).
    reply_to: str | None = None
    # The user the job acts for (its status is theirs to read); None for admin jobs.
    user_id: int | None = None

    @property
    def pending(self) -> bool:
        return self.status == JobStatus.PENDING.value


def _record_of(row: Row[Any]) -> JobRecord:
    return JobRecord(**row._mapping)


def _new_record(values: dict[str, Any], seq: int, created_at: dt.datetime) -> JobRecord:
    return JobRecord(
        id=values["id"],
        seq=seq,
        kind=values["kind"],
        partition=values["partition"],
        payload=values["payload"],
        status=JobStatus.PENDING.value,
        result=None,
        error=None,
        attempts=0,
        idempotency_key=values.get("idempotency_key"),
        request_hash=values.get("request_hash"),
        created_at=created_at,
        finished_at=None,
        reply_to=values.get("reply_to"),
        user_id=values.get("user_id"),
    )


@dataclass(frozen=True)
class Recorded:
    job: JobRecord
    created: bool  # False when an Idempotency-Key matched an existing job


class IdempotencyKeyReused(Exception):
    """The key was used before with other input."""


class WrittenTooLate(Exception):
    """The server received the job INSERT after its deadline and wrote nothing."""


@dataclass(frozen=True)
class NewJob:
    """A job row about to be written (without an Idempotency-Key)."""

    id: uuid.UUID
    kind: JobKind
    partition: str
    payload: dict[str, Any]
    reply_to: str | None = None
    user_id: int | None = None


def record(
    executor: Executor,
    *,
    kind: JobKind,
    payload: dict[str, Any],
    partitions: int,
    idempotency_scope: str | None = None,
    request_hash: str | None = None,
    job_id: uuid.UUID | None = None,
    reply_to: str | None = None,
    user_id: int | None = None,
    deadline: dt.datetime = NO_DEADLINE,
) -> Recorded:
    """Add a PENDING job row (the caller commits, or runs it on an autocommit connection).

    One statement, one round trip.  With ``idempotency_scope`` (method, path and client
    key), concurrent requests with one key create one row: ``INSERT .. ON CONFLICT DO
    NOTHING`` on the unique key, then the existing row is returned if its fingerprint
    matches, else ``IdempotencyKeyReused`` is raised.  ``job_id`` lets the caller know
    the id before the row exists (to listen for its outcome first), and ``reply_to``
    the channel its outcome is published to.  A server that receives the statement
    after ``deadline`` writes nothing (``WrittenTooLate``).
    """
    new = NewJob(
        job_id or new_job_id(),
        kind,
        partition_for_job(kind, payload, partitions),
        payload,
        reply_to,
        user_id,
    )
    if idempotency_scope is None:
        return Recorded(record_many(executor, [new], deadline=deadline)[0], created=True)
    values: dict[str, Any] = {
        "id": new.id,
        "kind": kind.value,
        "partition": new.partition,
        "payload": payload,
        "idempotency_key": idempotency_scope,
        "request_hash": request_hash,
        "reply_to": reply_to,
        "user_id": user_id,
    }
    inserted = executor.execute(
        _insert_once(tuple(values)), values | {"deadline": deadline}
    ).one_or_none()
    if inserted is not None:
        return Recorded(_new_record(values, *inserted), created=True)
    found = executor.execute(_KEYED_JOB, {"key": idempotency_scope}).one_or_none()
    if found is None:  # no key taken: the statement came after its deadline
        raise WrittenTooLate(str(new.id))
    existing = _record_of(found)
    if existing.request_hash != request_hash:
        raise IdempotencyKeyReused(idempotency_scope)
    return Recorded(existing, created=False)


_GET_JOB = _SELECT.where(_jobs.c.id == bindparam("job_id"))


# Many job rows in one statement, as array parameters (compiled once for any count);
# rows come back keyed by id, whatever order RETURNING uses.
_INSERT_MANY_SQL = """
    INSERT INTO jobs (id, kind, partition, payload, reply_to, user_id)
    SELECT id, kind, partition, payload::jsonb, reply_to, user_id
    FROM unnest(CAST({ids} AS uuid[]), CAST({kinds} AS text[]), CAST({partitions} AS text[]),
                CAST({payloads} AS text[]), CAST({reply_to} AS text[]),
                CAST({user_ids} AS bigint[]))
         AS new(id, kind, partition, payload, reply_to, user_id)
    WHERE statement_timestamp() < CAST({deadline} AS timestamptz)
    RETURNING id, seq, created_at
"""
_COLUMNS = ("ids", "kinds", "partitions", "payloads", "reply_to", "user_ids", "deadline")
_INSERT_MANY = text(_INSERT_MANY_SQL.format(**{c: f":{c}" for c in _COLUMNS}))
# The same for a DB-API cursor of psycopg (its ``pyformat`` parameters).
_INSERT_MANY_DBAPI = _INSERT_MANY_SQL.format(**{c: f"%({c})s" for c in _COLUMNS})


class Cursor(Protocol):
    """The part of a DB-API cursor ``record_many_on_cursor`` uses."""

    def execute(self, query: str, params: dict[str, Any]) -> Any: ...

    def fetchall(self) -> Sequence[Any]: ...


def _insert_parameters(jobs: list[NewJob], deadline: dt.datetime) -> dict[str, Any]:
    return {
        "deadline": deadline,
        "ids": [j.id for j in jobs],
        "kinds": [j.kind.value for j in jobs],
        "partitions": [j.partition for j in jobs],
        "payloads": [json.dumps(j.payload) for j in jobs],
        "reply_to": [j.reply_to for j in jobs],
        "user_ids": [j.user_id for j in jobs],
    }


def _recorded(jobs: list[NewJob], rows: Iterable[tuple[Any, ...]]) -> list[JobRecord]:
    made = {job_id: (seq, created_at) for job_id, seq, created_at in rows}
    if len(made) < len(jobs):  # none written: received after the deadline
        raise WrittenTooLate(str(jobs[0].id))
    return [
        _new_record(
            {
                "id": j.id,
                "kind": j.kind.value,
                "partition": j.partition,
                "payload": j.payload,
                "reply_to": j.reply_to,
                "user_id": j.user_id,
            },
            *made[j.id],
        )
        for j in jobs
    ]


def record_many(
    executor: Executor, jobs: list[NewJob], *, deadline: dt.datetime = NO_DEADLINE
) -> list[JobRecord]:
    """Add PENDING job rows, one statement for all (the caller commits, or autocommit);
    none if the server receives it after ``deadline`` (``WrittenTooLate``)."""
    rows = executor.execute(_INSERT_MANY, _insert_parameters(jobs, deadline))
    return _recorded(jobs, (tuple(row) for row in rows))


def record_many_on_cursor(
    cursor: Cursor, jobs: list[NewJob], *, deadline: dt.datetime = NO_DEADLINE
) -> list[JobRecord]:
    """``record_many`` on a psycopg cursor of an autocommit connection: the statement
    is its own transaction.  The group commit of job rows runs it for every job POST:
    without SQLAlchemy's connection and execution context around it, the INSERT costs
    web about half the CPU (raises the driver's own errors, not SQLAlchemy's)."""
    cursor.execute(_INSERT_MANY_DBAPI, _insert_parameters(jobs, deadline))
    return _recorded(jobs, cursor.fetchall())


def get_job(executor: Executor, job_id: uuid.UUID) -> JobRecord | None:
    row = executor.execute(_GET_JOB, {"job_id": job_id}).one_or_none()
    return None if row is None else _record_of(row)


_FINISHED_AMONG = _SELECT.where(
    _jobs.c.id == any_of("job_ids", UUID(as_uuid=True)),
    _jobs.c.status != JobStatus.PENDING.value,
)


def get_finished_jobs(executor: Executor, job_ids: list[uuid.UUID]) -> list[JobRecord]:
    """Those of ``job_ids`` that have finished (one query with one array parameter,
    however many are asked)."""
    if not job_ids:
        return []
    return [_record_of(row) for row in executor.execute(_FINISHED_AMONG, {"job_ids": job_ids})]


_ahead = _jobs.alias("ahead")
_AHEAD = (
    select(_ahead.c.seq)
    .where(
        _ahead.c.partition == _jobs.c.partition,
        _ahead.c.status == JobStatus.PENDING.value,
        _ahead.c.seq < _jobs.c.seq,
    )
    .limit(POSITION_CAP)
    .correlate(_jobs)
    .subquery()
)
# A job and, only while it is PENDING (CASE does not run the count otherwise), how many
# PENDING jobs of its partition were committed before it: one round trip.
_GET_JOB_WITH_POSITION = select(
    *_jobs.c,
    case(
        (
            _jobs.c.status == JobStatus.PENDING.value,
            select(func.count()).select_from(_AHEAD).scalar_subquery(),
        ),
        else_=None,
    ).label("ahead"),
).where(_jobs.c.id == bindparam("job_id"))


def get_job_with_position(
    executor: Executor, job_id: uuid.UUID
) -> tuple[JobRecord, int | None] | None:
    """The job and, if it is PENDING, its ``position.ahead`` (exact up to POSITION_CAP)."""
    row = executor.execute(_GET_JOB_WITH_POSITION, {"job_id": job_id}).one_or_none()
    if row is None:
        return None
    fields = dict(row._mapping)
    ahead = fields.pop("ahead")
    return JobRecord(**fields), ahead


def job_document(
    *,
    job_id: uuid.UUID,
    kind: str,
    status: str,
    result: dict[str, Any] | None,
    error: dict[str, Any] | None,
    created_at: dt.datetime,
    finished_at: dt.datetime | None,
    partition: str,
    ahead: int | None = None,
) -> dict[str, Any]:
    """The job status document of API.md (``GET /v1/jobs/{id}``, and ``Prefer: wait``)."""
    pending = status == JobStatus.PENDING.value
    return {
        "jobId": str(job_id),
        "kind": kind,
        "status": status,
        "result": result,
        "error": error,
        "createdAt": rfc3339(created_at),
        "finishedAt": rfc3339(finished_at) if finished_at else None,
        "position": {"partition": partition, "ahead": ahead or 0} if pending else None,
    }


def document_of(job: JobRecord, ahead: int | None = None) -> dict[str, Any]:
    return job_document(
        job_id=job.id,
        kind=job.kind,
        status=job.status,
        result=job.result,
        error=job.error,
        created_at=job.created_at,
        finished_at=job.finished_at,
        partition=job.partition,
        ahead=ahead,
    )


def partition_lock_id(queue: str) -> int:
    """The key of ``queue``'s advisory lock (a stable hash, as for routing)."""
    return int.from_bytes(
        hashlib.blake2b(queue.encode(), digest_size=8).digest(), "big", signed=True
    )


_LOCK_PARTITION = select(func.pg_advisory_xact_lock(bindparam("lock_id")))

# The drain's read (rule 6: batches follow what is in flight, not what one partition
# holds): the PENDING jobs of every partition of one kind whose advisory lock this
# transaction can take, in seq order, locked.  ``backlog`` lists the partitions with
# PENDING jobs, oldest first; ``walk`` try-locks them in that order (a partition
# another drainer holds is skipped, never waited for) until the partitions it got hold
# as many jobs as the batch takes, so a second drainer of the kind finds the rest.
# The try-lock is volatile: these CTEs are never inlined, and the walk's CASE keeps it
# from running once the batch is full.
# The statement's snapshot may predate a lock it takes, so it may see as PENDING jobs
# that the drainer which held that lock has just finished: FOR UPDATE re-checks each
# row it locks against the committed version (EvalPlanQual) and skips those, so only
# still-PENDING jobs come back, in seq order, and each partition's jobs form a prefix
# of its queue; jobs committed after the snapshot are the next batch's.
_LOCK_PENDING_BATCH = """
    WITH RECURSIVE backlog AS MATERIALIZED (
        SELECT p.queue, p.lock_id, count(*) AS pending,
               row_number() OVER (ORDER BY min(j.seq)) AS n
        FROM unnest({queues}, {lock_ids}) AS p(queue, lock_id)
        JOIN jobs AS j ON j.partition = p.queue AND j.status = 'PENDING'
        GROUP BY p.queue, p.lock_id
    ), walk(n, taken, queue) AS (
        SELECT CAST(0 AS bigint), CAST(0 AS bigint), CAST(NULL AS text)
        UNION ALL
        SELECT b.n, w.taken + CASE WHEN g.got THEN b.pending ELSE 0 END,
               CASE WHEN g.got THEN b.queue END
        FROM walk AS w
        JOIN backlog AS b ON b.n = w.n + 1
        CROSS JOIN LATERAL (
            SELECT CASE WHEN w.taken < :limit THEN pg_try_advisory_xact_lock(b.lock_id)
                        ELSE false END AS got
        ) AS g
    )
    SELECT j.* FROM jobs AS j
    WHERE j.status = 'PENDING' AND j.partition IN (SELECT queue FROM walk)
    ORDER BY j.seq
    LIMIT :limit
    FOR UPDATE OF j
    """
# Whether a partition of the kind holds a PENDING job that no drainer holds now (the
# try-lock, in an autocommit statement, is let go at once).  A partition another
# drainer holds is left to it: that drainer looks again after its commit.
_HAS_UNHELD_PENDING = """
    SELECT 1
    FROM unnest({queues}, {lock_ids}) AS p(queue, lock_id)
    WHERE CASE WHEN EXISTS (
              SELECT 1 FROM jobs WHERE partition = p.queue AND status = 'PENDING')
          THEN pg_try_advisory_xact_lock(p.lock_id) ELSE false END
    LIMIT 1
    """
_LOCK_PENDING_JOB = _SELECT.where(
    _jobs.c.id == bindparam("job_id"), _jobs.c.status == JobStatus.PENDING.value
).with_for_update()


_QUEUE_NAME = re.compile(r"^[a-z0-9_.]+$")


@functools.lru_cache(maxsize=64)
def _for_queues(template: str, queues: tuple[str, ...]) -> TextClause:
    """``template`` with the queues and their lock ids as array literals: a kind's
    queues never change, so its statements are built once (psycopg then prepares them)
    and no execution pays for dumping the arrays."""
    if not all(_QUEUE_NAME.match(queue) for queue in queues):
        raise ValueError(f"not a queue name among {queues}")
    lock_ids = ",".join(str(partition_lock_id(queue)) for queue in queues)
    return text(
        template.format(
            queues=f"CAST('{{{','.join(queues)}}}' AS text[])",
            lock_ids=f"CAST('{{{lock_ids}}}' AS bigint[])",
        )
    )


def lock_pending_batch(session: Session, queues: list[str], limit: int) -> list[JobRecord]:
    """The oldest PENDING jobs of those of ``queues`` (one partition kind) whose advisory
    locks this transaction takes, locked, in commit order; at most ``limit``.

    Each partition's transaction-scoped advisory lock makes its applier exclusive
    (rule 6) whichever worker took which wake-up: a partition held by another drainer
    is skipped, and each partition's jobs come back as a prefix of its queue in seq
    order, so one resource's jobs are never reordered.
    """
    rows = session.execute(_for_queues(_LOCK_PENDING_BATCH, tuple(queues)), {"limit": limit})
    return [_record_of(row) for row in rows]


def has_unheld_pending(executor: Executor, queues: list[str]) -> bool:
    """Whether one of ``queues`` holds a PENDING job and no drainer holds its lock."""
    statement = _for_queues(_HAS_UNHELD_PENDING, tuple(queues))
    return executor.execute(statement).first() is not None


def lock_pending_job(session: Session, queue: str, job_id: uuid.UUID) -> JobRecord | None:
    """One job of ``queue``, locked, if it is still PENDING (for the one-by-one replay)."""
    lock_partition(session, queue)
    row = session.execute(_LOCK_PENDING_JOB, {"job_id": job_id}).one_or_none()
    return None if row is None else _record_of(row)


def lock_partition(session: Session, queue: str) -> None:
    """Hold the partition's transaction-scoped advisory lock: one applier per partition."""
    session.execute(_LOCK_PARTITION, {"lock_id": partition_lock_id(queue)})


@dataclass(frozen=True)
class JobOutcome:
    """How a job finished: SUCCEEDED with a result, or FAILED with an error."""

    job: JobRecord
    status: JobStatus
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    finished_at: dt.datetime

    @classmethod
    def succeeded(cls, job: JobRecord, result: dict[str, Any], at: dt.datetime) -> JobOutcome:
        return cls(job, JobStatus.SUCCEEDED, result, None, at)

    @classmethod
    def failed(cls, job: JobRecord, code: ErrorCode, message: str, at: dt.datetime) -> JobOutcome:
        return cls(job, JobStatus.FAILED, None, {"code": code.value, "message": message}, at)

    def document(self) -> dict[str, Any]:
        return job_document(
            job_id=self.job.id,
            kind=self.job.kind,
            status=self.status.value,
            result=self.result,
            error=self.error,
            created_at=self.job.created_at,
            finished_at=self.finished_at,
            partition=self.job.partition,
        )


# The outcomes of a batch as one JSON parameter, so the UPDATE compiles once whatever
# the batch size: jsonb_to_recordset(:outcomes) AS outcome(id uuid, status ..., ...).
# The ids again as an array (``id = ANY(:ids)``): joined only to the recordset, the
# planner hashed every PENDING or every row of the jobs partitions per batch (a
# sequential scan of a young partition: a third of PostgreSQL's CPU in the mixed load).
_OUTCOMES = (
    func.jsonb_to_recordset(bindparam("outcomes", type_=JSONB))
    .table_valued(
        column("id", UUID(as_uuid=True)),
        column("status", String),
        column("result", JSONB),
        column("error", JSONB),
        column("finished_at", DateTime(timezone=True)),
        name="outcome",
    )
    .render_derived(with_types=True)
)
_FINISH = (
    update(_jobs)
    .where(
        _jobs.c.id == any_of("ids", UUID(as_uuid=True)),
        _jobs.c.id == _OUTCOMES.c.id,
        _jobs.c.status == JobStatus.PENDING.value,
    )
    .values(
        status=_OUTCOMES.c.status,
        result=_OUTCOMES.c.result,
        error=_OUTCOMES.c.error,
        finished_at=_OUTCOMES.c.finished_at,
    )
    .returning(_jobs.c.id)
)


def finish_jobs(session: Session, outcomes: list[JobOutcome]) -> None:
    """Write the outcomes of a batch in one UPDATE (only jobs still PENDING change).

    Raises if a job was not PENDING any more: its lock was bypassed, so the batch
    must roll back rather than record a second outcome.
    """
    if not outcomes:
        return
    rows = session.execute(
        _FINISH,
        {
            "ids": [o.job.id for o in outcomes],
            "outcomes": [
                {
                    "id": str(o.job.id),
                    "status": o.status.value,
                    "result": o.result,
                    "error": o.error,
                    "finished_at": o.finished_at.isoformat(),
                }
                for o in outcomes
            ],
        },
    ).all()
    if len(rows) != len(outcomes):
        raise RuntimeError(f"{len(outcomes) - len(rows)} jobs of a batch were finished under it")


def count_attempt(session: Session, job_id: uuid.UUID) -> int:
    """Record one failed attempt at applying a job; returns the attempts so far."""
    return int(
        session.execute(
            update(_jobs)
            .where(_jobs.c.id == job_id)
            .values(attempts=_jobs.c.attempts + 1)
            .returning(_jobs.c.attempts)
        ).scalar_one()
    )


def stale_partitions(session: Session, older_than: dt.timedelta) -> list[str]:
    """Partitions holding a job PENDING for longer than ``older_than`` (for the sweeper)."""
    cutoff = func.now() - older_than
    return list(
        session.execute(
            select(_jobs.c.partition)
            .where(_jobs.c.status == JobStatus.PENDING.value, _jobs.c.created_at < cutoff)
            .distinct()
        ).scalars()
    )


# ---- telling waiting web processes ------------------------------------------------

# KEYS: ``waiters:<id>`` of each finished job; ARGV: per job its id, its row's
# ``reply_to`` ('' if none) and its status document (JSON).  Each channel named by a
# job gets one message with the documents meant for it, ``{"<id>": document, ...}``:
# a web process parses only the outcomes of its own waiters, however many web
# processes run.  A job nobody waits for costs a set lookup and no message.
_ANNOUNCE = """
local parts, channels = {}, {}
for i = 1, #KEYS do
  local id, reply, document = ARGV[3 * i - 2], ARGV[3 * i - 1], ARGV[3 * i]
  local targets = redis.call('SMEMBERS', KEYS[i])
  if reply ~= '' then table.insert(targets, reply) end
  local told = {}
  for _, channel in ipairs(targets) do
    if not told[channel] then
      told[channel] = true
      if parts[channel] == nil then
        parts[channel] = {}
        table.insert(channels, channel)
      end
      table.insert(parts[channel], '"' .. id .. '":' .. document)
    end
  end
end
for _, channel in ipairs(channels) do
  redis.call('PUBLISH', channel, '{' .. table.concat(parts[channel], ',') .. '}')
end
return #channels
"""


def announce_finished(pipe: redis.client.Pipeline, outcomes: list[JobOutcome]) -> None:
    """Queue on ``pipe`` the publication of each outcome to the web processes waiting
    for it (after commit, never inside the transaction).

    EVAL, not a registered Script: on a pipeline, redis-py asks SCRIPT EXISTS before
    every execute (a round trip more); Redis caches the compiled body by its hash."""
    keys: list[str] = []
    args: list[str] = []
    for outcome in outcomes:
        job_id = str(outcome.job.id)
        keys.append(waiters_key(job_id))
        args += [job_id, outcome.job.reply_to or "", json.dumps(outcome.document())]
    pipe.eval(_ANNOUNCE, len(keys), *keys, *args)


# ---- what operators see of the partitions (GET /v1/admin/partitions) ----------

# Broker db hash: partition queue -> when a drainer last committed a batch of it (epoch
# milliseconds).  Kept outside PostgreSQL: written after commit, in the pipeline that
# announces the batch, off the batch's transaction.
LAST_DRAIN_KEY = "partitions:last_drain"


def note_drain(broker: redis.Redis | redis.client.Pipeline, queues: Iterable[str]) -> None:
    """Record (in the broker's database, beside the queues) that a batch of each of
    ``queues`` was just committed.  Call after the commit, never inside it; on a
    pipeline, it rides with the batch's other notes.  Best effort: a lost note only
    leaves the last drain older than it is."""
    now = str(int(time.time() * 1000))
    broker.hset(LAST_DRAIN_KEY, mapping=dict.fromkeys(queues, now))


def last_drains(flags: redis.Redis) -> dict[str, dt.datetime]:
    """When each partition was last drained (raises ``redis.RedisError`` if Redis is away)."""
    raw: dict[bytes, bytes] = flags.hgetall(LAST_DRAIN_KEY)  # type: ignore[assignment]  # sync client
    return {
        queue.decode(): dt.datetime.fromtimestamp(int(ms) / 1000, dt.UTC)
        for queue, ms in raw.items()
    }


@dataclass(frozen=True)
class Backlog:
    pending: int
    oldest_age_ms: int


def partition_backlogs(session: Session) -> dict[str, Backlog]:
    """PENDING jobs of each partition that has any, and the age of its oldest (by the
    database's clock), in one pass over the partial index of PENDING jobs."""
    age = func.extract("epoch", func.now() - func.min(Job.created_at)) * 1000
    rows = session.execute(
        select(Job.partition, func.count(), age)
        .where(Job.status == JobStatus.PENDING.value)
        .group_by(Job.partition)
    )
    return {queue: Backlog(int(count), max(int(ms), 0)) for queue, count, ms in rows}
