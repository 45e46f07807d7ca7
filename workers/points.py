"""Points jobs, on the user's partition."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from shared.domain.points import Balance, charge_points, use_points
from shared.jobs import JobKind
from shared.models import Job
from workers.base import Effects, Runtime, handles


def _result(balance: Balance) -> dict[str, Any]:
    return {"userId": balance.user_id, "amount": balance.amount}


@handles(JobKind.POINTS_CHARGE)
def apply_points_charge(
    _rt: Runtime, session: Session, job: Job, _effects: Effects
) -> dict[str, Any]:
    payload = job.payload
    return _result(charge_points(session, payload["userId"], payload["amount"], job_id=job.id))


@handles(JobKind.POINTS_USE)
def apply_points_use(_rt: Runtime, session: Session, job: Job, _effects: Effects) -> dict[str, Any]:
    payload = job.payload
    return _result(use_points(session, payload["userId"], payload["amount"], job_id=job.id))
