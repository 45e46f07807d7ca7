"""GET /v1/jobs/{jobId}: a job's status, with an optional long poll."""

from __future__ import annotations

import uuid

from flask import Blueprint, Response, current_app
from werkzeug.exceptions import NotFound

from shared.jobs import JobStatus, get_job
from web.api import operation
from web.render import job_view, render
from web.schemas import JobView, JobWaitQuery
from web.session import db_session
from web.waiters import JobWaiters

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")


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
    # Job status always reads the primary: a job just answered 202 must never 404.
    session = db_session()
    job = get_job(session, key)
    if job is None:
        raise NotFound()
    if job.status == JobStatus.PENDING and query.wait > 0:
        waiters: JobWaiters = current_app.extensions["job_waiters"]

        def finished() -> bool:
            session.close()  # hold no connection while waiting
            current = get_job(session, key)
            return current is not None and current.status != JobStatus.PENDING

        wait_seconds = min(query.wait, current_app.extensions["settings"].max_wait_seconds)
        waiters.wait(str(key), wait_seconds, finished)
        job = get_job(session, key) or job
    return render(job_view(job))
