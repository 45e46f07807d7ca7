"""Accepting a job: commit the row, then wake its partition (ARCHITECTURE rule 3).

``accept_job`` is the only way web hands work to the workers.  The row is
committed before anything is sent; once it is, the answer is 202 whatever the
broker does, and a send that fails is left to the sweeper.  Both the database
and the broker sit behind circuit breakers, so while either is known to be down
a job POST answers 503 at once and writes nothing.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from typing import Any, Protocol

import psycopg
import pybreaker
from celery import Celery
from flask import Response, current_app, jsonify, request
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from shared.broker import TRANSPORT as BROKER_TRANSPORT
from shared.broker import WakeUpTemplates
from shared.cache import make_redis, redis_keepalive_options
from shared.config import Settings
from shared.db import write_deadline
from shared.domain.errors import ErrorCode
from shared.jobs import (
    WAKE_FLAG_SECONDS,
    IdempotencyKeyReused,
    JobKind,
    JobRecord,
    JobStatus,
    NewJob,
    WrittenTooLate,
    fingerprint,
    get_job,
    partition_for_job,
    record,
    record_many,
    record_many_on_cursor,
    task_for_queue,
    wake_key,
)
from shared.metrics import count_accepted
from shared.retention import new_job_id
from web.api import settings
from web.breaker import Breaker
from web.errors import ApiError, unavailable, validation_error
from web.identity import idempotency_owner
from web.jobs import await_document, current_document
from web.recording import GroupCommit
from web.session import autocommit
from web.waiters import JobWaiters

log = logging.getLogger(__name__)

# Look-ups of a job row whose COMMIT lost its answer, before answering 503.
COMMIT_CHECK_TRIES = 3
COMMIT_CHECK_SECONDS = 1.0
# API.md caps ``Prefer: wait`` at 30 seconds (and at MAX_WAIT_SECONDS).
MAX_PREFER_WAIT_SECONDS = 30

_IDEMPOTENCY_KEY = re.compile(r"^[\x20-\x7e]{1,128}$")


class Publisher(Protocol):
    def wake(self, queue: str) -> None:
        """Make sure the consumer of ``queue`` will look at its pending jobs."""

    def wake_many(self, queues: list[str]) -> None:
        """``wake`` each of ``queues`` (one round trip where the broker allows)."""

    def ping(self) -> None:
        """Raise if the broker cannot be reached."""


class CeleryPublisher:
    """Sends ``jobs.drain`` wake-ups by task name (web never imports workers)."""

    def __init__(self, settings: Settings) -> None:
        self._celery = Celery("shop-web", broker=settings.broker_url, set_as_current=False)
        self._celery.conf.update(
            broker_transport=BROKER_TRANSPORT,
            task_serializer="json",
            accept_content=["json"],
            broker_connection_timeout=1,
            broker_connection_retry=False,
            broker_connection_max_retries=0,
            broker_transport_options={
                "visibility_timeout": settings.visibility_timeout_seconds,
                "socket_timeout": 1,
                "socket_connect_timeout": 1,
                **redis_keepalive_options(settings),
            },
        )
        self._broker = make_redis(settings.broker_url, timeout=1.0, settings=settings)
        self._wake_ups = WakeUpTemplates(self._broker, self._send_unsafe_in_transaction)

    def _send_unsafe_in_transaction(self, queue: str) -> None:
        self._celery.send_task(task_for_queue(queue), args=[queue], queue=queue, retry=False)

    def wake(self, queue: str) -> None:
        """One wake-up in flight per partition: set its flag and send, or do nothing."""
        self.wake_many([queue])

    def wake_many(self, queues: list[str]) -> None:
        self._wake_ups.wake_many([(wake_key(q), q) for q in queues], WAKE_FLAG_SECONDS)

    def ping(self) -> None:
        self._broker.ping()


def _breakers(settings: Settings) -> tuple[Breaker, Breaker]:
    db = Breaker(
        fail_max=settings.breaker_fail_max,
        reset_timeout=settings.breaker_reset_seconds,
        exclude=[IdempotencyKeyReused, ApiError],
        name="database",
    )
    broker = Breaker(
        fail_max=settings.breaker_fail_max,
        reset_timeout=settings.breaker_reset_seconds,
        name="broker",
    )
    return db, broker


def install_publishing(app: Any, settings: Settings, publisher: Publisher | None) -> None:
    db_breaker, broker_breaker = _breakers(settings)
    app.extensions["publisher"] = publisher or CeleryPublisher(settings)
    app.extensions["db_breaker"] = db_breaker
    app.extensions["broker_breaker"] = broker_breaker
    app.extensions["job_recorder"] = GroupCommit[NewJob, JobRecord]()


def _idempotency_scope() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not _IDEMPOTENCY_KEY.match(key):
        raise validation_error(
            [{"field": "Idempotency-Key", "message": "must be 1..128 printable ASCII characters"}]
        )
    # With AUTH_MODE=jwt the key is also the token's user's: another user's key is not seen.
    return f"{request.method} {request.path} {idempotency_owner()}{key}"


def preferred_wait() -> int | None:
    """Seconds asked for by ``Prefer: wait=<n>`` (RFC 7240), capped; None if not asked.

    A preference that cannot be understood is ignored, never refused (RFC 7240 §2).
    Of several ``wait`` preferences the first counts.
    """
    # One key (the server joins repeated header lines); getlist would walk every header.
    header = request.headers.get("Prefer")
    if header is not None:
        for preference in header.split(","):
            name, _, value = preference.split(";", 1)[0].partition("=")
            if name.strip().lower() != "wait":
                continue
            value = value.strip().strip('"')
            if not value.isascii() or not value.isdigit() or int(value) <= 0:
                return None
            return min(int(value), MAX_PREFER_WAIT_SECONDS, settings().max_wait_seconds)
    return None


def job_accepted(job: JobRecord) -> Response:
    status_url = f"/v1/jobs/{job.id}"
    response = jsonify({"jobId": str(job.id), "status": job.status, "statusUrl": status_url})
    response.status_code = 202
    response.headers["Location"] = status_url
    return response


def job_finished(document: dict[str, Any], applied_wait: int) -> Response:
    """``Prefer: wait`` honoured: the finished job's status document, as GET answers it."""
    response = jsonify(document)
    response.headers["Location"] = f"/v1/jobs/{document['jobId']}"
    response.headers["Preference-Applied"] = f"wait={applied_wait}"
    return response


def _ensure_broker_reachable(breaker: Breaker, publisher: Publisher) -> None:
    """503 before writing anything while the broker is known to be down."""
    if breaker.current_state == pybreaker.STATE_CLOSED:
        return
    try:
        breaker.call(publisher.ping)
    except Exception as exc:
        raise unavailable("the job queue is unavailable; retry later") from exc


def _committed_anyway(job_id: uuid.UUID) -> JobRecord | None:
    """The job, if its COMMIT went through although its answer was lost (connection broken).

    A 503 may only say that no row was committed (API.md), so before answering it after a
    failed COMMIT, look the row up on a fresh connection (a few quick tries).  ``None``:
    not committed, or the database stays unreachable (then it cannot be known).
    """
    started = time.monotonic()
    for attempt in range(COMMIT_CHECK_TRIES):
        try:
            with autocommit() as connection:
                return get_job(connection, job_id)
        except DBAPIError:
            # A server that does not answer at all (frozen, cut off) costs a connect
            # timeout a try: the request is not held for more than one.
            if time.monotonic() - started >= COMMIT_CHECK_SECONDS:
                break
            time.sleep(0.1 * (attempt + 1))
    return None


class _WriteFailed(Exception):
    """A batch's INSERT failed; ``connected``: it reached the database (the rows may exist)."""

    def __init__(self, connected: bool) -> None:
        super().__init__("the job rows could not be written")
        self.connected = connected


def _write_batch(batch: list[NewJob]) -> list[JobRecord]:
    """One INSERT (its own transaction) for a batch of job rows, then their partitions
    woken in one round trip.  Runs through the database breaker, in the request that
    writes the batch (``web.recording``)."""
    db_breaker: Breaker = current_app.extensions["db_breaker"]
    writer: Engine | None = current_app.extensions.get("job_writer_engine")

    def insert() -> list[JobRecord]:
        connected = False
        try:
            deadline = write_deadline(settings())
            if writer is None:  # tests inject their own session factory
                with autocommit() as connection:
                    connected = True
                    return record_many(connection, batch, deadline=deadline)
            # Straight on the driver's cursor (a pool of one: the group commit has one
            # batch in flight at a time); the pool still discards a dropped connection.
            raw = writer.raw_connection()
            connected = True
            try:
                return record_many_on_cursor(raw.cursor(), batch, deadline=deadline)
            except psycopg.Error:
                raw.invalidate()  # it may be broken: the next batch gets another
                raise
            finally:
                raw.close()  # back to its pool
        except (DBAPIError, psycopg.Error, WrittenTooLate) as exc:
            raise _WriteFailed(connected) from exc

    jobs: list[JobRecord] = db_breaker.call(insert)
    _wake({job.partition for job in jobs})
    return jobs


def _wake(queues: set[str]) -> None:
    """Committed: from here on the answer is 202, whatever this does (the sweeper re-sends
    a wake-up that is lost)."""
    publisher: Publisher = current_app.extensions["publisher"]
    broker_breaker: Breaker = current_app.extensions["broker_breaker"]
    try:
        broker_breaker.call(publisher.wake_many, sorted(queues))
    except Exception as exc:
        log.warning("jobs of %s committed but not sent (sweeper will): %s", sorted(queues), exc)


def _unavailable_unless_committed(
    job_id: uuid.UUID, connected: bool, exc: BaseException
) -> JobRecord:
    """After a failed write: the job, if its row was committed after all; else 503."""
    found = _committed_anyway(job_id) if connected else None
    if found is None:
        log.warning(
            "job not accepted, database unavailable: %s", exc, extra={"job_id": str(job_id)}
        )
        raise unavailable("the database is unavailable; retry later") from exc
    log.warning(
        "job %s: the answer to COMMIT was lost, the row is there: %s",
        found.id,
        exc,
        extra={"job_id": str(found.id)},
    )
    _wake({found.partition})
    return found


def _record_and_commit(
    kind: JobKind,
    payload: dict[str, Any],
    scope: str | None,
    job_id: uuid.UUID,
    reply_to: str | None,
) -> JobRecord:
    """Write the job row, committed, and wake its partition; 503 / 422 if not written.

    Without an Idempotency-Key the row joins the group commit of the requests in flight
    (``web.recording``); with one, it is written alone (its conflict decides the answer).
    """
    if scope is None:
        recorder: GroupCommit[NewJob, JobRecord] = current_app.extensions["job_recorder"]
        partition = partition_for_job(kind, payload, settings().partitions)
        try:
            new = NewJob(job_id, kind, partition, payload, reply_to, user_id=payload.get("userId"))
            return recorder.submit(new, _write_batch)
        except _WriteFailed as failed:
            cause = failed.__cause__ or failed
            return _unavailable_unless_committed(job_id, failed.connected, cause)
        except pybreaker.CircuitBreakerError as exc:
            return _unavailable_unless_committed(job_id, False, exc)

    db_breaker: Breaker = current_app.extensions["db_breaker"]
    connected = False

    def record_and_commit() -> JobRecord:
        nonlocal connected
        with autocommit() as connection:
            connected = True  # from here on the row may exist, answer or not
            return record(
                connection,
                kind=kind,
                payload=payload,
                partitions=settings().partitions,
                idempotency_scope=scope,
                request_hash=fingerprint(request.method, request.path, payload),
                job_id=job_id,
                reply_to=reply_to,
                user_id=payload.get("userId"),
                deadline=write_deadline(settings()),
            ).job

    try:
        job: JobRecord = db_breaker.call(record_and_commit)
    except IdempotencyKeyReused as exc:
        raise ApiError(
            422, ErrorCode.IDEMPOTENCY_KEY_REUSED, "this Idempotency-Key was used with other input"
        ) from exc
    except (pybreaker.CircuitBreakerError, DBAPIError, WrittenTooLate) as exc:
        return _unavailable_unless_committed(job_id, connected, exc)
    if job.pending:
        _wake({job.partition})
    return job


def accept_job(kind: JobKind, payload: dict[str, Any]) -> Response:
    """Record the job, commit, then wake its partition; answer 202 (or 503 / 422).

    With ``Prefer: wait=<n>`` the answer waits up to n seconds for the job to finish
    and is then 200 with its status document (API.md); the waiter is registered
    before the row exists, so a worker that finishes the job at once is not missed.
    """
    publisher: Publisher = current_app.extensions["publisher"]
    broker_breaker: Breaker = current_app.extensions["broker_breaker"]
    waiters: JobWaiters = current_app.extensions["job_waiters"]

    scope = _idempotency_scope()
    wait = preferred_wait()
    started = time.monotonic()
    _ensure_broker_reachable(broker_breaker, publisher)
    job_id = new_job_id()  # time-ordered: it names the partition that holds the job
    # The row names this process's channel: the worker that finishes it tells only us.
    reply_to = waiters.channel if wait else None
    with waiters.waiting(str(job_id)) if wait else contextlib.nullcontext() as waiter:
        job = _record_and_commit(kind, payload, scope, job_id, reply_to)
        if job.id == job_id:  # committed now, not an Idempotency-Key replay
            count_accepted(kind.value)
        if wait is None:
            return job_accepted(job)
        if job.id != job_id:  # an Idempotency-Key replay: the existing job's outcome
            document = await_document(job.id, wait)
        else:
            assert waiter is not None
            # n seconds from the request, not from the commit: a slow wake-up (the
            # broker away, its timeout) is not added on top.
            left = wait - (time.monotonic() - started)
            document = waiter.wait(left) or current_document(job.id)
    if document is None or document["status"] == JobStatus.PENDING.value:
        return job_accepted(job)
    return job_finished(document, wait)
