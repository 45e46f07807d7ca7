"""The user partition: points charges and uses, and order payments, decided in order."""

from __future__ import annotations

from sqlalchemy.orm import Session

from shared.domain.errors import DomainError
from shared.domain.payments import (
    Payment,
    PaymentRequest,
    UserOutcome,
    UserRequest,
    apply_user_requests,
)
from shared.domain.points import PointChange, PointRequest
from shared.jobs import JobKind, JobRecord
from shared.partitions import PartitionKind
from workers.base import Effects, Outcome, Runtime, handles

_CHANGE = {JobKind.POINTS_CHARGE: PointChange.CHARGE, JobKind.POINTS_USE: PointChange.USE}


def _request(job: JobRecord) -> UserRequest:
    if JobKind(job.kind) is JobKind.ORDER_PAY:
        return PaymentRequest(
            job.payload["userId"], job.payload["orderId"], job.payload.get("couponId"), job.id
        )
    return PointRequest(
        job.payload["userId"], _CHANGE[JobKind(job.kind)], job.payload["amount"], job.id
    )


def _result(outcome: UserOutcome) -> Outcome:
    if isinstance(outcome, DomainError):
        return outcome
    if isinstance(outcome, Payment):
        return outcome.result()
    return {"userId": outcome.user_id, "amount": outcome.amount}


@handles(PartitionKind.USER)
def apply_point_jobs(
    _rt: Runtime, session: Session, jobs: list[JobRecord], effects: Effects
) -> list[Outcome]:
    applied = apply_user_requests(session, [_request(j) for j in jobs])
    effects.history |= applied.orders_completed  # COMPLETED history rows in the outbox
    return [_result(o) for o in applied.outcomes]
