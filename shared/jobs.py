"""The job record: how an accepted mutation is stored, routed and finished.

A job row is the truth (ARCHITECTURE rule 3).  The broker carries only a wake-up
for a partition queue; its consumer reads that partition's PENDING rows in the
order they were committed, so a lost, duplicated or late message changes nothing.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from shared.domain.errors import ErrorCode
from shared.models import Job
from shared.partitions import HISTORY_QUEUE, PartitionKind, partition


class JobKind(enum.StrEnum):
    POINTS_CHARGE = "POINTS_CHARGE"
    POINTS_USE = "POINTS_USE"
    STOCK_SET = "STOCK_SET"
    ORDER_CREATE = "ORDER_CREATE"
    COUPON_ISSUE = "COUPON_ISSUE"


class JobStatus(enum.StrEnum):
    PENDING = "PENDING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


# Task names cross the process boundary: web and the sweeper send by name.
DRAIN_TASK = "jobs.drain"
HISTORY_TASK = "history.drain"

# Redis (coordination db) names shared by web and workers.
FINISHED_CHANNEL = "jobs:finished"


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
    """Set while a wake-up for ``queue`` is in flight, so bursts send one message, not N."""
    return f"wake:{queue}"


PARTITION_KIND_OF: dict[JobKind, PartitionKind] = {
    JobKind.POINTS_CHARGE: PartitionKind.USER,
    JobKind.POINTS_USE: PartitionKind.USER,
    JobKind.STOCK_SET: PartitionKind.PRODUCT,
    JobKind.ORDER_CREATE: PartitionKind.PRODUCT,
    JobKind.COUPON_ISSUE: PartitionKind.COUPON,
}


def routing_key(kind: JobKind, payload: dict[str, Any]) -> int:
    """The resource whose partition applies this job."""
    if kind in (JobKind.POINTS_CHARGE, JobKind.POINTS_USE):
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


@dataclass(frozen=True)
class Recorded:
    job: Job
    created: bool  # False when an Idempotency-Key matched an existing job


class IdempotencyKeyReused(Exception):
    """The key was used before with other input."""


def record(
    session: Session,
    *,
    kind: JobKind,
    payload: dict[str, Any],
    partitions: int,
    idempotency_scope: str | None = None,
    request_hash: str | None = None,
) -> Recorded:
    """Add a PENDING job row (the caller commits).

    With ``idempotency_scope`` (method, path and client key), concurrent requests
    with one key create one row: ``INSERT .. ON CONFLICT DO NOTHING`` on the unique
    key, then the existing row is returned if its fingerprint matches, else
    ``IdempotencyKeyReused`` is raised.
    """
    values = {
        "id": uuid.uuid4(),
        "kind": kind.value,
        "partition": partition_for_job(kind, payload, partitions),
        "payload": payload,
        "idempotency_key": idempotency_scope,
        "request_hash": request_hash,
    }
    stmt = insert(Job).values(**values)
    if idempotency_scope is not None:
        stmt = stmt.on_conflict_do_nothing(index_elements=["idempotency_key"])
    inserted = session.scalars(stmt.returning(Job)).one_or_none()
    if inserted is None:
        existing = session.execute(
            select(Job).where(Job.idempotency_key == idempotency_scope)
        ).scalar_one()
        if existing.request_hash != request_hash:
            raise IdempotencyKeyReused(idempotency_scope)
        return Recorded(existing, created=False)
    return Recorded(inserted, created=True)


def get_job(session: Session, job_id: uuid.UUID) -> Job | None:
    return session.get(Job, job_id, populate_existing=True)


def lock_pending_batch(session: Session, queue: str, limit: int) -> list[Job]:
    """The oldest PENDING jobs of ``queue``, locked, in commit order.

    The transaction-scoped advisory lock makes the partition's consumer exclusive
    even if two workers ever receive its wake-ups (a rebalance, a sweeper re-send):
    the second waits, then finds those jobs finished.
    """
    lock_partition(session, queue)
    return list(
        session.execute(
            select(Job)
            .where(Job.partition == queue, Job.status == JobStatus.PENDING.value)
            .order_by(Job.seq)
            .limit(limit)
            .with_for_update()
        ).scalars()
    )


def partition_has_pending(session: Session, queue: str) -> bool:
    return (
        session.execute(
            select(Job.id)
            .where(Job.partition == queue, Job.status == JobStatus.PENDING.value)
            .limit(1)
        ).first()
        is not None
    )


def lock_pending_job(session: Session, queue: str, job_id: uuid.UUID) -> Job | None:
    """One job of ``queue``, locked, if it is still PENDING (for the one-by-one replay)."""
    lock_partition(session, queue)
    return session.execute(
        select(Job).where(Job.id == job_id, Job.status == JobStatus.PENDING.value).with_for_update()
    ).scalar_one_or_none()


def lock_partition(session: Session, queue: str) -> None:
    """Hold the partition's transaction-scoped advisory lock: one applier per partition."""
    lock_id = int.from_bytes(
        hashlib.blake2b(queue.encode(), digest_size=8).digest(), "big", signed=True
    )
    session.execute(select(func.pg_advisory_xact_lock(lock_id)))


def mark_succeeded(job: Job, result: dict[str, Any]) -> None:
    job.status = JobStatus.SUCCEEDED.value
    job.result = result
    job.finished_at = dt.datetime.now(dt.UTC)


def mark_failed(job: Job, code: ErrorCode, message: str) -> None:
    job.status = JobStatus.FAILED.value
    job.error = {"code": code.value, "message": message}
    job.finished_at = dt.datetime.now(dt.UTC)


def count_attempt(session: Session, job_id: uuid.UUID) -> int:
    """Record one failed attempt at applying a job; returns the attempts so far."""
    return int(
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(attempts=Job.attempts + 1)
            .returning(Job.attempts)
        ).scalar_one()
    )


def stale_partitions(session: Session, older_than: dt.timedelta) -> list[str]:
    """Partitions holding a job PENDING for longer than ``older_than`` (for the sweeper)."""
    cutoff = func.now() - older_than
    return list(
        session.execute(
            select(Job.partition)
            .where(Job.status == JobStatus.PENDING.value, Job.created_at < cutoff)
            .distinct()
        ).scalars()
    )


def purge_idempotency_keys(session: Session, older_than: dt.timedelta) -> int:
    """Forget Idempotency-Keys older than the retention (API.md: at least 24 hours)."""
    result = session.execute(
        update(Job)
        .where(Job.idempotency_key.is_not(None), Job.created_at < func.now() - older_than)
        .values(idempotency_key=None)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]  # CursorResult of an UPDATE


# ---- what operators see of the partitions (GET /v1/admin/partitions) ----------

# Coordination db hash: partition queue -> when a drainer last committed a batch of
# it (epoch milliseconds).  Kept outside PostgreSQL: written after commit, once per
# batch, off the batch's transaction.
LAST_DRAIN_KEY = "partitions:last_drain"


def note_drain(flags: redis.Redis, queue: str) -> bool:
    """Record that a batch of ``queue`` was just committed; False if Redis is away.

    Call after the commit, never inside it.  Best effort: a lost note only leaves
    the last drain older than it is, and never fails the drain.
    """
    try:
        flags.hset(LAST_DRAIN_KEY, queue, str(int(time.time() * 1000)))
    except redis.RedisError:
        return False
    return True


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
