"""Coupon rules on a real database: never past the quantity, one per user, precedence."""

from __future__ import annotations

import pytest
from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.domain.coupons import (
    coupon_holders,
    create_coupon,
    get_coupon,
    issue_coupon,
    list_user_coupons,
)
from shared.domain.errors import (
    CouponAlreadyIssued,
    CouponNotFound,
    CouponSoldOut,
    DomainError,
    ErrorCode,
    NotFound,
)
from shared.models import Coupon, UserCoupon

UNKNOWN_ID = 2**63 - 1


def holds_coupon(session: Session, coupon_id: int, user_id: int) -> bool:
    query = select(func.count()).select_from(UserCoupon)
    return bool(
        session.execute(
            query.where(UserCoupon.coupon_id == coupon_id, UserCoupon.user_id == user_id)
        ).scalar_one()
    )


def count_issued(session: Session, coupon_id: int) -> int:
    query = select(func.count()).select_from(UserCoupon).where(UserCoupon.coupon_id == coupon_id)
    return int(session.execute(query).scalar_one())


def is_sold_out(session: Session, coupon_id: int) -> bool:
    left = session.execute(
        select(Coupon.total_quantity - Coupon.issued_quantity).where(Coupon.id == coupon_id)
    )
    return left.scalar_one_or_none() == 0


def _issue(session: Session, coupon_id: int, user_id: int) -> UserCoupon:
    with session.begin_nested():  # as the worker runs it: a refusal undoes only this issue
        return issue_coupon(session, coupon_id, user_id)


def _refusal(session: Session, coupon_id: int, user_id: int) -> ErrorCode:
    with pytest.raises(DomainError) as caught:
        _issue(session, coupon_id, user_id)
    return caught.value.code


def _issued_quantity(session: Session, coupon_id: int) -> int:
    session.expire_all()
    return get_coupon(session, coupon_id).issued_quantity


def test_create_then_get(db_session: Session) -> None:
    coupon = create_coupon(db_session, name="Welcome", discount_amount=500, total_quantity=3)
    got = get_coupon(db_session, coupon.id)
    assert (got.name, got.discount_amount, got.total_quantity, got.issued_quantity) == (
        "Welcome",
        500,
        3,
        0,
    )
    with pytest.raises(NotFound):
        get_coupon(db_session, UNKNOWN_ID)


def test_issue_until_sold_out_then_refuse(db_session: Session) -> None:
    coupon = create_coupon(db_session, name="C", discount_amount=1, total_quantity=3)
    issued = [_issue(db_session, coupon.id, user) for user in (10, 11, 12)]
    assert [uc.user_id for uc in issued] == [10, 11, 12]
    assert len({uc.id for uc in issued}) == 3
    assert is_sold_out(db_session, coupon.id)
    assert _refusal(db_session, coupon.id, 13) is ErrorCode.COUPON_SOLD_OUT
    assert _issued_quantity(db_session, coupon.id) == 3
    assert count_issued(db_session, coupon.id) == 3
    assert sorted(coupon_holders(db_session, coupon.id)) == [10, 11, 12]


def test_one_coupon_per_user(db_session: Session) -> None:
    coupon = create_coupon(db_session, name="C", discount_amount=1, total_quantity=5)
    _issue(db_session, coupon.id, 20)
    assert holds_coupon(db_session, coupon.id, 20)
    assert not holds_coupon(db_session, coupon.id, 21)
    assert _refusal(db_session, coupon.id, 20) is ErrorCode.COUPON_ALREADY_ISSUED
    assert _issued_quantity(db_session, coupon.id) == 1
    assert not is_sold_out(db_session, coupon.id)


def test_already_issued_beats_sold_out(db_session: Session) -> None:
    coupon = create_coupon(db_session, name="C", discount_amount=1, total_quantity=1)
    _issue(db_session, coupon.id, 30)
    assert _refusal(db_session, coupon.id, 30) is ErrorCode.COUPON_ALREADY_ISSUED
    assert _refusal(db_session, coupon.id, 31) is ErrorCode.COUPON_SOLD_OUT


def test_unknown_coupon_is_coupon_not_found(db_session: Session) -> None:
    with pytest.raises(CouponNotFound) as caught:
        _issue(db_session, UNKNOWN_ID, 1)
    assert caught.value.code is ErrorCode.COUPON_NOT_FOUND
    assert not is_sold_out(db_session, UNKNOWN_ID)


def test_refusals_have_their_classes(db_session: Session) -> None:
    coupon = create_coupon(db_session, name="C", discount_amount=1, total_quantity=1)
    _issue(db_session, coupon.id, 1)
    with pytest.raises(CouponAlreadyIssued):
        _issue(db_session, coupon.id, 1)
    with pytest.raises(CouponSoldOut):
        _issue(db_session, coupon.id, 2)


def test_a_users_coupons_come_in_the_order_issued(db_session: Session) -> None:
    user = 4_000_001
    first = create_coupon(db_session, name="Zeta", discount_amount=100, total_quantity=9)
    second = create_coupon(db_session, name="Alpha", discount_amount=200, total_quantity=9)
    other = create_coupon(db_session, name="Other", discount_amount=1, total_quantity=9)
    _issue(db_session, second.id, user)
    _issue(db_session, first.id, user)
    _issue(db_session, other.id, user + 1)
    rows = list_user_coupons(db_session, user)
    assert [(c.id, c.name, c.discount_amount, uc.user_id) for uc, c in rows] == [
        (second.id, "Alpha", 200, user),
        (first.id, "Zeta", 100, user),
    ]
    assert rows[0][0].id < rows[1][0].id


def test_database_refuses_a_second_coupon_for_one_user_on_its_own(db_session: Session) -> None:
    coupon = create_coupon(db_session, name="C", discount_amount=1, total_quantity=5)
    _issue(db_session, coupon.id, 40)
    with (
        pytest.raises(IntegrityError, match="uq_user_coupons_coupon_id_user_id"),
        db_session.begin_nested(),
    ):
        db_session.execute(insert(UserCoupon).values(coupon_id=coupon.id, user_id=40))
    assert count_issued(db_session, coupon.id) == 1


def test_database_refuses_issuing_past_the_quantity_on_its_own(db_session: Session) -> None:
    coupon = create_coupon(db_session, name="C", discount_amount=1, total_quantity=2)
    with (
        pytest.raises(IntegrityError, match="ck_coupons_not_over_issued"),
        db_session.begin_nested(),
    ):
        db_session.execute(update(Coupon).where(Coupon.id == coupon.id).values(issued_quantity=3))
    assert _issued_quantity(db_session, coupon.id) == 0
