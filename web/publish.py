"""Accepting a job: commit the row, then wake its partition (ARCHITECTURE rule 3).

``accept_job`` is the only way web hands work to the workers.  The row is
committed before anything is sent; once it is, the answer is 202 whatever the
broker does, and a send that fails is left to the sweeper.  Both the database
and the broker sit behind circuit breakers, so while either is known to be down
a job POST answers 503 at once and writes nothing.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any, Protocol

import pybreaker
from celery import Celery
from flask import Response, current_app, jsonify, request
from sqlalchemy.exc import DBAPIError

from shared.cache import make_redis
from shared.config import Settings
from shared.domain.errors import ErrorCode
from shared.jobs import (
    IdempotencyKeyReused,
    JobKind,
    fingerprint,
    get_job,
    record,
    task_for_queue,
    wake_partition,
)
from shared.models import Job
from web.errors import ApiError, unavailable, validation_error
from web.session import db_session

log = logging.getLogger(__name__)

# Look-ups of a job row whose COMMIT lost its answer, before answering 503.
COMMIT_CHECK_TRIES = 3

_IDEMPOTENCY_KEY = re.compile(r"^[\x20-\x7e]{1,128}$")


class Publisher(Protocol):
    def wake(self, queue: str) -> None:
        """Make sure the consumer of ``queue`` will look at its pending jobs."""

    def ping(self) -> None:
        """Raise if the broker cannot be reached."""


class CeleryPublisher:
    """Sends ``jobs.drain`` wake-ups by task name (web never imports workers)."""

    def __init__(self, settings: Settings) -> None:
        self._celery = Celery("shop-web", broker=settings.broker_url, set_as_current=False)
        self._celery.conf.update(
            task_serializer="json",
            accept_content=["json"],
            broker_connection_timeout=1,
            broker_connection_retry=False,
            broker_connection_max_retries=0,
            broker_transport_options={
                "visibility_timeout": settings.visibility_timeout_seconds,
                "socket_timeout": 1,
                "socket_connect_timeout": 1,
            },
        )
        self._flags = make_redis(settings.coordination_url, timeout=1.0)
        self._broker = make_redis(settings.broker_url, timeout=1.0)

    def _send_unsafe_in_transaction(self, queue: str) -> None:
        self._celery.send_task(task_for_queue(queue), args=[queue], queue=queue, retry=False)

    def wake(self, queue: str) -> None:
        wake_partition(self._flags, queue, self._send_unsafe_in_transaction)

    def ping(self) -> None:
        self._broker.ping()


def _breakers(settings: Settings) -> tuple[pybreaker.CircuitBreaker, pybreaker.CircuitBreaker]:
    db = pybreaker.CircuitBreaker(
        fail_max=settings.breaker_fail_max,
        reset_timeout=settings.breaker_reset_seconds,
        exclude=[IdempotencyKeyReused, ApiError],
        name="database",
    )
    broker = pybreaker.CircuitBreaker(
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


def _idempotency_scope() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not _IDEMPOTENCY_KEY.match(key):
        raise validation_error(
            [{"field": "Idempotency-Key", "message": "must be 1..128 printable ASCII characters"}]
        )
    return f"{request.method} {request.path} {key}"


def job_accepted(job: Job) -> Response:
    status_url = f"/v1/jobs/{job.id}"
    response = jsonify({"jobId": str(job.id), "status": job.status, "statusUrl": status_url})
    response.status_code = 202
    response.headers["Location"] = status_url
    return response


def _ensure_broker_reachable(breaker: pybreaker.CircuitBreaker, publisher: Publisher) -> None:
    """503 before writing anything while the broker is known to be down."""
    if breaker.current_state == pybreaker.STATE_CLOSED:
        return
    try:
        breaker.call(publisher.ping)
    except Exception as exc:
        raise unavailable("the job queue is unavailable; retry later") from exc


def _committed_anyway(job_id: uuid.UUID) -> Job | None:
    """The job, if its COMMIT went through although its answer was lost (connection broken).

    A 503 may only say that no row was committed (API.md), so before answering it after a
    failed COMMIT, look the row up on a fresh connection (a few quick tries).  ``None``:
    not committed, or the database stays unreachable (then it cannot be known).
    """
    factory = current_app.extensions["session_factory"]
    for attempt in range(COMMIT_CHECK_TRIES):
        try:
            with factory() as session:
                return get_job(session, job_id)
        except DBAPIError:
            time.sleep(0.1 * (attempt + 1))
    return None


def accept_job(kind: JobKind, payload: dict[str, Any]) -> Response:
    """Record the job, commit, then wake its partition; answer 202 (or 503 / 422)."""
    app = current_app
    settings: Settings = app.extensions["settings"]
    publisher: Publisher = app.extensions["publisher"]
    db_breaker: pybreaker.CircuitBreaker = app.extensions["db_breaker"]
    broker_breaker: pybreaker.CircuitBreaker = app.extensions["broker_breaker"]

    scope = _idempotency_scope()
    _ensure_broker_reachable(broker_breaker, publisher)

    committing: list[uuid.UUID] = []  # the job whose COMMIT was sent, once it is

    def record_and_commit() -> Job:
        session = db_session()
        try:
            recorded = record(
                session,
                kind=kind,
                payload=payload,
                partitions=settings.partitions,
                idempotency_scope=scope,
                request_hash=fingerprint(request.method, request.path, payload) if scope else None,
            )
            committing.append(recorded.job.id)
            session.commit()
        except BaseException:
            session.rollback()
            raise
        return recorded.job

    try:
        job = db_breaker.call(record_and_commit)
    except IdempotencyKeyReused as exc:
        raise ApiError(
            422, ErrorCode.IDEMPOTENCY_KEY_REUSED, "this Idempotency-Key was used with other input"
        ) from exc
    except (pybreaker.CircuitBreakerError, DBAPIError) as exc:
        found = _committed_anyway(committing[0]) if committing else None
        if found is None:
            log.warning("job not accepted, database unavailable: %s", exc)
            raise unavailable("the database is unavailable; retry later") from exc
        log.warning("job %s: the answer to COMMIT was lost, the row is there: %s", found.id, exc)
        job = found

    # Committed: from here on the answer is 202 (the sweeper covers a failed send).
    if job.status == "PENDING":
        try:
            broker_breaker.call(publisher.wake, job.partition)
        except Exception as exc:
            log.warning("job %s committed but not sent (sweeper will): %s", job.id, exc)
    return job_accepted(job)
