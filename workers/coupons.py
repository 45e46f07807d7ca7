"""Coupon issues, on the coupon's partition.

Once a coupon is sold out (it never comes back: v1 has no redemption), the
worker keeps a sold-out marker and the set of holders in Redis, and settles
further requests from them without touching the coupon's rows: a holder gets
``COUPON_ALREADY_ISSUED``, anyone else ``COUPON_SOLD_OUT``.  Redis can only ever
refuse, never issue, so losing it costs speed, not correctness.
"""

from __future__ import annotations

import functools
import logging

import redis
from sqlalchemy.orm import Session

from shared.domain.coupons import IssuedCoupon, IssueRequest, coupon_holders, issue_coupons
from shared.domain.errors import CouponAlreadyIssued, CouponSoldOut, DomainError
from shared.jobs import JobRecord
from shared.partitions import PartitionKind
from workers.base import Effects, Outcome, Runtime, handles

log = logging.getLogger(__name__)


def sold_out_key(coupon_id: int) -> str:
    return f"coupon:{coupon_id}:sold-out"


def holders_key(coupon_id: int) -> str:
    return f"coupon:{coupon_id}:holders"


def settle_from_markers(rt: Runtime, requests: list[IssueRequest]) -> list[DomainError | None]:
    """The failure Redis already knows for each request on a sold-out coupon, else None."""
    try:
        pipe = rt.coordination.pipeline(transaction=False)
        for r in requests:
            pipe.exists(sold_out_key(r.coupon_id))
            pipe.sismember(holders_key(r.coupon_id), str(r.user_id))
        answers = pipe.execute()
    except redis.RedisError as exc:
        log.warning("sold-out markers unavailable: %s", exc)
        return [None] * len(requests)
    settled: list[DomainError | None] = []
    for r, sold_out, holder in zip(requests, answers[::2], answers[1::2], strict=True):
        if not sold_out:
            settled.append(None)
        elif holder:
            settled.append(
                CouponAlreadyIssued(f"user {r.user_id} already holds coupon {r.coupon_id}")
            )
        else:
            settled.append(CouponSoldOut(f"coupon {r.coupon_id} is sold out"))
    return settled


def remember_sold_out(rt: Runtime, *, coupon_id: int) -> None:
    """Store the holders, then the marker: whoever sees the marker sees every holder."""
    with rt.session_factory() as session:
        holders = coupon_holders(session, coupon_id)
    pipe = rt.coordination.pipeline(transaction=True)
    if holders:
        pipe.sadd(holders_key(coupon_id), *[str(h) for h in holders])
    pipe.set(sold_out_key(coupon_id), 1)
    pipe.execute()


@handles(PartitionKind.COUPON)
def apply_coupon_jobs(
    rt: Runtime, session: Session, jobs: list[JobRecord], effects: Effects
) -> list[Outcome]:
    requests = [IssueRequest(j.payload["couponId"], j.payload["userId"]) for j in jobs]
    settled = settle_from_markers(rt, requests)
    open_requests = [r for r, known in zip(requests, settled, strict=True) if known is None]
    issued = issue_coupons(session, open_requests) if open_requests else None
    for coupon_id in issued.sold_out if issued else ():
        effects.later[sold_out_key(coupon_id)] = functools.partial(
            remember_sold_out, coupon_id=coupon_id
        )
    fresh = iter(issued.outcomes if issued else [])
    outcomes: list[Outcome] = []
    for r, known in zip(requests, settled, strict=True):
        outcome = known if known is not None else next(fresh)
        if isinstance(outcome, IssuedCoupon):
            outcomes.append(
                {"couponId": r.coupon_id, "userId": r.user_id, "userCouponId": outcome.id}
            )
        else:
            outcomes.append(outcome)
    return outcomes
