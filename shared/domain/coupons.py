"""Coupons: first come, first served, never past the quantity, at most one per user."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from sqlalchemy import Table, bindparam, select, text, update
from sqlalchemy.orm import Session

from shared.domain.errors import (
    CouponAlreadyIssued,
    CouponNotFound,
    CouponSoldOut,
    DomainError,
    NotFound,
    unwrap,
)
from shared.models import Coupon, UserCoupon


def create_coupon(
    session: Session, *, name: str, discount_amount: int, total_quantity: int
) -> Coupon:
    coupon = Coupon(name=name, discount_amount=discount_amount, total_quantity=total_quantity)
    session.add(coupon)
    session.flush()  # to obtain the generated id and server defaults
    session.refresh(coupon)
    return coupon


def get_coupon(session: Session, coupon_id: int) -> Coupon:
    """Raises ``NotFound``."""
    coupon = session.get(Coupon, coupon_id, populate_existing=True)
    if coupon is None:
        raise NotFound(f"coupon {coupon_id} does not exist")
    return coupon


@dataclass(frozen=True)
class IssueRequest:
    coupon_id: int
    user_id: int


@dataclass(frozen=True)
class IssuedCoupon:
    id: int  # the userCouponId
    coupon_id: int
    user_id: int


@dataclass(frozen=True)
class IssueOutcomes:
    outcomes: list[IssuedCoupon | DomainError]
    sold_out: set[int]  # coupons of the batch with none left afterwards


_coupons = cast(Table, Coupon.__table__)  # Core UPDATE with executemany parameters
_COUNT_ISSUED = (
    update(_coupons)
    .where(
        _coupons.c.id == bindparam("cid"),
        _coupons.c.issued_quantity + bindparam("n") <= _coupons.c.total_quantity,
    )
    .values(issued_quantity=_coupons.c.issued_quantity + bindparam("n"))
)


# The batch's new holders in one statement, as array parameters (compiled once).
_ISSUE = text(
    "INSERT INTO user_coupons (coupon_id, user_id)"
    " SELECT * FROM unnest(CAST(:coupons AS bigint[]), CAST(:users AS bigint[]))"
    " RETURNING coupon_id, user_id, id"
)


def issue_coupons(session: Session, requests: list[IssueRequest]) -> IssueOutcomes:
    """Issue coupons in arrival order; one outcome per request.

    The coupons are locked ``FOR UPDATE`` (ascending id) and their current holders
    read before anything is decided.  Precedence per API.md: not found, then
    already issued, then sold out.  Each coupon's count is then raised once by a
    guarded ``issued_quantity + n <= total_quantity`` UPDATE, backed by
    ``ck_coupons_not_over_issued``; one per user is ``uq_user_coupons_coupon_id_user_id``.
    Refusals: ``CouponNotFound``, ``CouponAlreadyIssued``, ``CouponSoldOut``.
    """
    coupon_ids = sorted({r.coupon_id for r in requests})
    remaining: dict[int, int] = dict(
        session.execute(
            select(Coupon.id, Coupon.total_quantity - Coupon.issued_quantity)
            .where(Coupon.id.in_(coupon_ids))
            .order_by(Coupon.id)
            .with_for_update()
        ).all()
    )
    holders = {
        (coupon_id, user_id)
        for coupon_id, user_id in session.execute(
            select(UserCoupon.coupon_id, UserCoupon.user_id).where(
                UserCoupon.coupon_id.in_(list(remaining)),
                UserCoupon.user_id.in_(sorted({r.user_id for r in requests})),
            )
        )
    }
    decided: list[IssueRequest | DomainError] = []
    issued: dict[int, int] = {}
    for r in requests:
        if r.coupon_id not in remaining:
            decided.append(CouponNotFound(f"coupon {r.coupon_id} does not exist"))
        elif (r.coupon_id, r.user_id) in holders:
            decided.append(
                CouponAlreadyIssued(f"user {r.user_id} already holds coupon {r.coupon_id}")
            )
        elif remaining[r.coupon_id] <= 0:
            decided.append(CouponSoldOut(f"coupon {r.coupon_id} is sold out"))
        else:
            holders.add((r.coupon_id, r.user_id))
            remaining[r.coupon_id] -= 1
            issued[r.coupon_id] = issued.get(r.coupon_id, 0) + 1
            decided.append(r)
    ids: dict[tuple[int, int], int] = {}
    new_rows = [
        {"coupon_id": d.coupon_id, "user_id": d.user_id}
        for d in decided
        if isinstance(d, IssueRequest)
    ]
    if new_rows:
        for coupon_id, n in sorted(issued.items()):
            if session.execute(_COUNT_ISSUED, {"cid": coupon_id, "n": n}).rowcount != 1:  # type: ignore[attr-defined]
                raise RuntimeError(f"coupon {coupon_id} count guard refused {n} more")
        ids = {
            (c, u): i
            for c, u, i in session.execute(
                _ISSUE,
                {
                    "coupons": [row["coupon_id"] for row in new_rows],
                    "users": [row["user_id"] for row in new_rows],
                },
            )
        }
    outcomes: list[IssuedCoupon | DomainError] = [
        IssuedCoupon(ids[(d.coupon_id, d.user_id)], d.coupon_id, d.user_id)
        if isinstance(d, IssueRequest)
        else d
        for d in decided
    ]
    return IssueOutcomes(outcomes, {c for c in coupon_ids if c in remaining and remaining[c] <= 0})


def issue_coupon(session: Session, coupon_id: int, user_id: int) -> IssuedCoupon:
    """Give the user one coupon while any remain.  Raises as ``issue_coupons`` refuses."""
    return unwrap(issue_coupons(session, [IssueRequest(coupon_id, user_id)]).outcomes[0])


def coupon_holders(session: Session, coupon_id: int) -> list[int]:
    return list(
        session.execute(
            select(UserCoupon.user_id).where(UserCoupon.coupon_id == coupon_id)
        ).scalars()
    )


def list_user_coupons(session: Session, user_id: int) -> list[tuple[UserCoupon, Coupon]]:
    """The user's coupons in the order issued."""
    rows = session.execute(
        select(UserCoupon, Coupon)
        .join(Coupon, Coupon.id == UserCoupon.coupon_id)
        .where(UserCoupon.user_id == user_id)
        .order_by(UserCoupon.id)
    )
    return [(user_coupon, coupon) for user_coupon, coupon in rows]
