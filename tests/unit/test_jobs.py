"""The job record on a real database: idempotency, routing, retention, the sweeper's view."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from shared.domain.errors import ErrorCode
from shared.jobs import (
    DRAIN_TASK,
    HISTORY_TASK,
    PARTITION_KIND_OF,
    IdempotencyKeyReused,
    JobKind,
    JobOutcome,
    JobRecord,
    JobStatus,
    count_attempt,
    document_of,
    fingerprint,
    finish_jobs,
    get_finished_jobs,
    get_job,
    get_job_with_position,
    lock_pending_batch,
    lock_pending_job,
    partition_for_job,
    record,
    stale_partitions,
    task_for_queue,
)
from shared.models import Job
from shared.partitions import HISTORY_QUEUE, PartitionKind, all_partition_queues, partition

COUNT = 16
CHARGE = {"userId": 5, "amount": 100}


def _scope() -> str:
    return f"POST /v1/points/charge {uuid.uuid4()}"


def _age(session: Session, job_id: uuid.UUID, by: dt.timedelta) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(created_at=Job.created_at - by))


def _succeed(session: Session, job: JobRecord, result: dict[str, Any]) -> None:
    finish_jobs(session, [JobOutcome.succeeded(job, result, dt.datetime.now(dt.UTC))])


def _fail(session: Session, job: JobRecord, code: ErrorCode, message: str) -> None:
    finish_jobs(session, [JobOutcome.failed(job, code, message, dt.datetime.now(dt.UTC))])


def test_record_without_a_key_adds_a_pending_row(db_session: Session) -> None:
    first = record(db_session, kind=JobKind.POINTS_CHARGE, payload=CHARGE, partitions=COUNT)
    second = record(db_session, kind=JobKind.POINTS_CHARGE, payload=CHARGE, partitions=COUNT)
    assert first.created
    assert second.created
    assert first.job.id != second.job.id
    job = first.job
    assert (job.kind, job.status, job.payload, job.attempts) == (
        "POINTS_CHARGE",
        JobStatus.PENDING.value,
        CHARGE,
        0,
    )
    assert job.partition == partition(PartitionKind.USER, 5, COUNT)
    assert (job.idempotency_key, job.result, job.error, job.finished_at) == (None, None, None, None)
    assert job.created_at.tzinfo is not None
    assert second.job.seq > first.job.seq


def test_same_key_and_input_returns_the_existing_job(db_session: Session) -> None:
    scope = _scope()
    digest = fingerprint("POST", "/v1/points/charge", CHARGE)
    first = record(
        db_session,
        kind=JobKind.POINTS_CHARGE,
        payload=CHARGE,
        partitions=COUNT,
        idempotency_scope=scope,
        request_hash=digest,
    )
    again = record(
        db_session,
        kind=JobKind.POINTS_CHARGE,
        payload=CHARGE,
        partitions=COUNT,
        idempotency_scope=scope,
        request_hash=digest,
    )
    assert (first.created, again.created) == (True, False)
    assert again.job.id == first.job.id


def test_same_key_with_other_input_is_refused(db_session: Session) -> None:
    scope = _scope()
    record(
        db_session,
        kind=JobKind.POINTS_CHARGE,
        payload=CHARGE,
        partitions=COUNT,
        idempotency_scope=scope,
        request_hash=fingerprint("POST", "/v1/points/charge", CHARGE),
    )
    other = {"userId": 5, "amount": 101}
    with pytest.raises(IdempotencyKeyReused):
        record(
            db_session,
            kind=JobKind.POINTS_CHARGE,
            payload=other,
            partitions=COUNT,
            idempotency_scope=scope,
            request_hash=fingerprint("POST", "/v1/points/charge", other),
        )
    # The refusal did not break the transaction.
    assert record(db_session, kind=JobKind.POINTS_USE, payload=CHARGE, partitions=COUNT).created


def test_fingerprint_is_canonical() -> None:
    a = fingerprint("POST", "/v1/orders", {"userId": 1, "orderLines": [{"productId": 2}]})
    b = fingerprint("POST", "/v1/orders", {"orderLines": [{"productId": 2}], "userId": 1})
    assert a == b
    assert len(a) == 64
    assert a != fingerprint("POST", "/v1/points/use", {"userId": 1, "orderLines": []})
    assert a != fingerprint("PUT", "/v1/orders", {"userId": 1, "orderLines": [{"productId": 2}]})


@pytest.mark.parametrize(
    ("kind", "payload", "expected"),
    [
        (JobKind.POINTS_CHARGE, {"userId": 3, "amount": 1}, "user.1"),
        (JobKind.POINTS_USE, {"userId": 42, "amount": 1}, "user.10"),
        (JobKind.STOCK_SET, {"productId": 42, "stock": 1}, "product.10"),
        (
            JobKind.ORDER_CREATE,
            {
                "userId": 2,
                "orderLines": [
                    {"productId": 9, "quantity": 1},
                    {"productId": 3, "quantity": 1},
                    {"productId": 5, "quantity": 1},
                ],
            },
            "product.1",  # product 3's partition; 9 -> product.5, 5 -> product.0, user 2 -> .12
        ),
        (JobKind.COUPON_ISSUE, {"couponId": 2, "userId": 3}, "coupon.12"),
        # The paying user's partition (user 42 -> user.10), not the order's (id 3 -> .1).
        (JobKind.ORDER_PAY, {"orderId": 3, "userId": 42, "couponId": 2}, "user.10"),
    ],
    ids=str,
)
def test_partition_for_job_routes_to_the_mutated_resource(
    kind: JobKind, payload: dict[str, Any], expected: str
) -> None:
    assert partition_for_job(kind, payload, COUNT) == expected


def test_every_job_kind_has_a_partition_kind_and_its_queues_a_drain_task() -> None:
    assert set(PARTITION_KIND_OF) == set(JobKind)
    for queue in all_partition_queues(COUNT):
        assert task_for_queue(queue) == DRAIN_TASK
    assert task_for_queue(HISTORY_QUEUE) == HISTORY_TASK


def test_stale_partitions_are_those_with_an_old_pending_job(db_session: Session) -> None:
    # Users 1, 2 and 3 land on distinct user partitions (6, 12 and 1 of 16).
    old = record(
        db_session, kind=JobKind.POINTS_CHARGE, payload=CHARGE | {"userId": 1}, partitions=COUNT
    ).job
    fresh = record(
        db_session, kind=JobKind.POINTS_CHARGE, payload=CHARGE | {"userId": 2}, partitions=COUNT
    ).job
    done = record(
        db_session, kind=JobKind.POINTS_CHARGE, payload=CHARGE | {"userId": 3}, partitions=COUNT
    ).job
    _age(db_session, old.id, dt.timedelta(minutes=1))
    _age(db_session, done.id, dt.timedelta(minutes=1))
    _succeed(db_session, done, {"userId": 3, "amount": 100})
    stale = stale_partitions(db_session, dt.timedelta(seconds=5))
    assert old.partition in stale
    assert fresh.partition not in stale
    assert done.partition not in stale
    assert len(stale) == len(set(stale))


def test_pending_batch_is_the_partitions_pending_jobs_in_commit_order(
    db_session: Session,
) -> None:
    payload = {"userId": 77, "amount": 1}
    jobs = [
        record(db_session, kind=JobKind.POINTS_CHARGE, payload=payload, partitions=COUNT).job
        for _ in range(4)
    ]
    elsewhere = record(
        db_session,
        kind=JobKind.POINTS_CHARGE,
        payload={"userId": 78, "amount": 1},
        partitions=COUNT,
    ).job
    assert elsewhere.partition != jobs[0].partition
    _fail(db_session, jobs[1], ErrorCode.INSUFFICIENT_POINTS, "no")
    queue = jobs[0].partition
    mine = {j.id for j in jobs}
    batch = [j.id for j in lock_pending_batch(db_session, [queue], 100) if j.id in mine]
    assert batch == [jobs[0].id, jobs[2].id, jobs[3].id]
    assert lock_pending_job(db_session, queue, jobs[1].id) is None
    locked = lock_pending_job(db_session, queue, jobs[2].id)
    assert locked is not None
    assert locked.id == jobs[2].id


def test_outcomes_and_attempts(db_session: Session) -> None:
    ok = record(db_session, kind=JobKind.POINTS_CHARGE, payload=CHARGE, partitions=COUNT).job
    bad = record(db_session, kind=JobKind.POINTS_USE, payload=CHARGE, partitions=COUNT).job
    _succeed(db_session, ok, {"userId": 5, "amount": 100})
    _fail(db_session, bad, ErrorCode.INSUFFICIENT_POINTS, "user 5 has fewer than 100 points")
    assert count_attempt(db_session, bad.id) == 1
    assert count_attempt(db_session, bad.id) == 2
    ok_row, bad_row = get_job(db_session, ok.id), get_job(db_session, bad.id)
    assert ok_row is not None
    assert bad_row is not None
    assert (ok_row.status, ok_row.result, ok_row.error) == (
        "SUCCEEDED",
        {"userId": 5, "amount": 100},
        None,
    )
    assert ok_row.finished_at is not None
    assert ok_row.finished_at.tzinfo is not None
    assert (bad_row.status, bad_row.error, bad_row.attempts) == (
        "FAILED",
        {"code": "INSUFFICIENT_POINTS", "message": "user 5 has fewer than 100 points"},
        2,
    )
    assert get_job(db_session, uuid.uuid4()) is None


def test_a_job_is_finished_once(db_session: Session) -> None:
    job = record(db_session, kind=JobKind.POINTS_CHARGE, payload=CHARGE, partitions=COUNT).job
    _succeed(db_session, job, {"userId": 5, "amount": 100})
    with pytest.raises(RuntimeError, match="finished under it"):
        _fail(db_session, job, ErrorCode.INSUFFICIENT_POINTS, "late")
    row = get_job(db_session, job.id)
    assert row is not None
    assert (row.status, row.error) == ("SUCCEEDED", None)


def _ahead(session: Session, job: JobRecord) -> int:
    found = get_job_with_position(session, job.id)
    assert found is not None
    assert found[1] is not None  # PENDING: it has a position
    return found[1]


def test_position_counts_the_pending_jobs_committed_before(db_session: Session) -> None:
    payload = {"userId": 4242, "amount": 1}
    jobs = [
        record(db_session, kind=JobKind.POINTS_CHARGE, payload=payload, partitions=COUNT).job
        for _ in range(5)
    ]
    before = _ahead(db_session, jobs[0])  # other suites' leftovers on this partition
    _fail(db_session, jobs[1], ErrorCode.INSUFFICIENT_POINTS, "no")
    # jobs[1] finished: it no longer counts for those after it.
    assert [_ahead(db_session, j) - before for j in (jobs[0], *jobs[2:])] == [0, 1, 2, 3]
    pending = document_of(jobs[4], _ahead(db_session, jobs[4]))
    assert pending["status"] == "PENDING"
    assert pending["position"] == {"partition": jobs[4].partition, "ahead": before + 3}
    assert pending["finishedAt"] is None


def test_finished_documents_are_what_get_answers(db_session: Session) -> None:
    ok = record(db_session, kind=JobKind.POINTS_CHARGE, payload=CHARGE, partitions=COUNT).job
    waiting = record(db_session, kind=JobKind.POINTS_USE, payload=CHARGE, partitions=COUNT).job
    at = dt.datetime(2026, 12, 1, 10, 0, 0, 123456, tzinfo=dt.UTC)
    outcome = JobOutcome.succeeded(ok, {"userId": 5, "amount": 100}, at)
    finish_jobs(db_session, [outcome])
    (finished,) = get_finished_jobs(db_session, [ok.id, waiting.id, uuid.uuid4()])
    assert document_of(finished) == outcome.document()
    assert outcome.document() == {
        "jobId": str(ok.id),
        "kind": "POINTS_CHARGE",
        "status": "SUCCEEDED",
        "result": {"userId": 5, "amount": 100},
        "error": None,
        "createdAt": document_of(ok)["createdAt"],
        "finishedAt": "2026-12-01T10:00:00.123Z",
        "position": None,
    }
