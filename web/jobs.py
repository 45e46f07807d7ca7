"""GET /v1/jobs/{jobId}: a job's status, with an optional long poll."""

from __future__ import annotations

import uuid
from typing import Any

from flask import Blueprint, Response, current_app, jsonify
from werkzeug.exceptions import NotFound

from shared.jobs import document_of, get_job, get_job_with_position
from web.api import operation, settings
from web.schemas import JobView, JobWaitQuery
from web.session import autocommit
from web.waiters import JobWaiters

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")


def current_document(job_id: uuid.UUID) -> dict[str, Any] | None:
    """The job's status document as the primary has it now (None: no such job).

    Job status always reads the primary: a job just answered 202 must never 404.
    The session is closed again at once, so a request that goes on to wait holds
    no database connection.
    """
    with autocommit() as connection:
        found = get_job_with_position(connection, job_id)
    return None if found is None else document_of(*found)


def await_document(job_id: uuid.UUID, seconds: float) -> dict[str, Any] | None:
    """The job's status document once it finishes, or after ``seconds`` as it is then."""
    waiters: JobWaiters = current_app.extensions["job_waiters"]
    with waiters.waiting(str(job_id), announce_for=seconds) as waiter:
        with autocommit() as connection:
            job = get_job(connection, job_id)
        if job is None:
            return None
        if not job.pending:
            return document_of(job)
        # Its position is only needed if it is still PENDING at the end: read it then.
        finished = waiter.wait(seconds)
    return finished or current_document(job_id)


def wait_cap(requested: int) -> int:
    return min(requested, settings().max_wait_seconds)


@operation(
    bp,
    "/<job_id>",
    "GET",
    summary="A job's status; `wait` long-polls until it finishes",
    query=JobWaitQuery,
    responses={200: JobView},
)
def get_job_status(job_id: str, query: JobWaitQuery) -> Response:
    try:
        key = uuid.UUID(job_id)
    except ValueError:
        raise NotFound() from None
    wait = wait_cap(query.wait)
    document = await_document(key, wait) if wait > 0 else current_document(key)
    if document is None:
        raise NotFound()
    return jsonify(document)
