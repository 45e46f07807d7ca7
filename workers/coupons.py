"""Coupon issues, on the coupon's partition.

Once a coupon is sold out (it never comes back: v1 has no redemption), the
worker keeps a sold-out marker and the set of holders in Redis, and settles
further requests from them without touching the coupon's rows: a holder gets
``COUPON_ALREADY_ISSUED``, anyone else ``COUPON_SOLD_OUT``.  Redis can only ever
refuse, never issue, so losing it costs speed, not correctness.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from sqlalchemy.orm import Session

from shared.domain.coupons import coupon_holders, is_sold_out, issue_coupon
from shared.domain.errors import CouponAlreadyIssued, CouponSoldOut
from shared.jobs import JobKind
from shared.models import Job
from workers.base import Effects, Runtime, handles

log = logging.getLogger(__name__)


def sold_out_key(coupon_id: int) -> str:
    return f"coupon:{coupon_id}:sold-out"


def holders_key(coupon_id: int) -> str:
    return f"coupon:{coupon_id}:holders"


def settle_from_marker(rt: Runtime, coupon_id: int, user_id: int) -> None:
    """Raise the failure Redis already knows for a sold-out coupon; return if it knows nothing."""
    try:
        pipe = rt.coordination.pipeline(transaction=False)
        pipe.exists(sold_out_key(coupon_id))
        pipe.sismember(holders_key(coupon_id), str(user_id))
        sold_out, holder = pipe.execute()
    except redis.RedisError as exc:
        log.warning("sold-out markers unavailable: %s", exc)
        return
    if not sold_out:
        return
    if holder:
        raise CouponAlreadyIssued(f"user {user_id} already holds coupon {coupon_id}")
    raise CouponSoldOut(f"coupon {coupon_id} is sold out")


def remember_sold_out(rt: Runtime, coupon_id: int) -> None:
    """Store the holders, then the marker: whoever sees the marker sees every holder."""
    with rt.session_factory() as session:
        holders = coupon_holders(session, coupon_id)
    pipe = rt.coordination.pipeline(transaction=True)
    if holders:
        pipe.sadd(holders_key(coupon_id), *[str(h) for h in holders])
    pipe.set(sold_out_key(coupon_id), 1)
    pipe.execute()


@handles(JobKind.COUPON_ISSUE)
def apply_coupon_issue(rt: Runtime, session: Session, job: Job, effects: Effects) -> dict[str, Any]:
    coupon_id, user_id = job.payload["couponId"], job.payload["userId"]
    settle_from_marker(rt, coupon_id, user_id)
    try:
        user_coupon = issue_coupon(session, coupon_id, user_id)
    except CouponSoldOut:
        effects.later[sold_out_key(coupon_id)] = lambda r: remember_sold_out(r, coupon_id)
        raise
    if is_sold_out(session, coupon_id):
        effects.later[sold_out_key(coupon_id)] = lambda r: remember_sold_out(r, coupon_id)
    return {"couponId": coupon_id, "userId": user_id, "userCouponId": user_coupon.id}
