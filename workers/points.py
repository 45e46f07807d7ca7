"""Points jobs (charges and uses), on the user's partition."""

from __future__ import annotations

from sqlalchemy.orm import Session

from shared.domain.errors import DomainError
from shared.domain.points import PointChange, PointRequest, apply_point_requests
from shared.jobs import JobKind, JobRecord
from shared.partitions import PartitionKind
from workers.base import Effects, Outcome, Runtime, handles

_CHANGE = {JobKind.POINTS_CHARGE: PointChange.CHARGE, JobKind.POINTS_USE: PointChange.USE}


@handles(PartitionKind.USER)
def apply_point_jobs(
    _rt: Runtime, session: Session, jobs: list[JobRecord], _effects: Effects
) -> list[Outcome]:
    requests = [
        PointRequest(j.payload["userId"], _CHANGE[JobKind(j.kind)], j.payload["amount"], j.id)
        for j in jobs
    ]
    return [
        o if isinstance(o, DomainError) else {"userId": o.user_id, "amount": o.amount}
        for o in apply_point_requests(session, requests)
    ]
