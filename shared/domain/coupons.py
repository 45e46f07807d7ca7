"""Coupons: first come, first served, never past the quantity, at most one per user."""

from __future__ import annotations

from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session

from shared.domain.errors import CouponAlreadyIssued, CouponNotFound, CouponSoldOut, NotFound
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


def issue_coupon(session: Session, coupon_id: int, user_id: int) -> UserCoupon:
    """Give the user one coupon while any remain.

    Precedence per API.md: not found, then already issued, then sold out.  The
    count is a guarded ``issued_quantity < total_quantity`` UPDATE, backed by
    ``ck_coupons_not_over_issued``; one per user is ``uq_user_coupons_coupon_id_user_id``.
    Raises ``CouponNotFound``, ``CouponAlreadyIssued``, ``CouponSoldOut``.
    """
    found = session.execute(
        select(Coupon.id).where(Coupon.id == coupon_id).with_for_update()
    ).scalar_one_or_none()
    if found is None:
        raise CouponNotFound(f"coupon {coupon_id} does not exist")
    if holds_coupon(session, coupon_id, user_id):
        raise CouponAlreadyIssued(f"user {user_id} already holds coupon {coupon_id}")
    counted = session.execute(
        update(Coupon)
        .where(Coupon.id == coupon_id, Coupon.issued_quantity < Coupon.total_quantity)
        .values(issued_quantity=Coupon.issued_quantity + 1)
        .returning(Coupon.id)
    ).scalar_one_or_none()
    if counted is None:
        raise CouponSoldOut(f"coupon {coupon_id} is sold out")
    user_coupon = UserCoupon(coupon_id=coupon_id, user_id=user_id)
    session.add(user_coupon)
    session.flush()  # to obtain the userCouponId for the job result
    return user_coupon


def holds_coupon(session: Session, coupon_id: int, user_id: int) -> bool:
    return bool(
        session.execute(
            select(exists().where(UserCoupon.coupon_id == coupon_id, UserCoupon.user_id == user_id))
        ).scalar()
    )


def coupon_holders(session: Session, coupon_id: int) -> list[int]:
    return list(
        session.execute(
            select(UserCoupon.user_id).where(UserCoupon.coupon_id == coupon_id)
        ).scalars()
    )


def is_sold_out(session: Session, coupon_id: int) -> bool:
    return bool(
        session.execute(
            select(Coupon.issued_quantity >= Coupon.total_quantity).where(Coupon.id == coupon_id)
        ).scalar()
    )


def list_user_coupons(session: Session, user_id: int) -> list[tuple[UserCoupon, Coupon]]:
    """The user's coupons in the order issued."""
    rows = session.execute(
        select(UserCoupon, Coupon)
        .join(Coupon, Coupon.id == UserCoupon.coupon_id)
        .where(UserCoupon.user_id == user_id)
        .order_by(UserCoupon.id)
    ).tuples()
    return list(rows)


def count_issued(session: Session, coupon_id: int) -> int:
    return int(
        session.execute(
            select(func.count()).select_from(UserCoupon).where(UserCoupon.coupon_id == coupon_id)
        ).scalar_one()
    )
