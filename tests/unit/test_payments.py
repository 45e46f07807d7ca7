"""Paying an order (API.md, Payment) on a real database: effects, every refusal and its
precedence, nothing of a refusal applied, and the order of a user partition's batch."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import event, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.domain.coupons import create_coupon, issue_coupon
from shared.domain.errors import DomainError, ErrorCode
from shared.domain.inventory import LineRequest, create_order
from shared.domain.orders import OrderStatus, change_order_status
from shared.domain.payments import Payment, PaymentRequest, apply_user_requests, pay
from shared.domain.points import Balance, PointChange, PointRequest, charge_points, get_balance
from shared.domain.products import create_product, get_product
from shared.models import Order, Outbox, PointBalance, PointHistory, UserCoupon

UNKNOWN_ID = 2**63 - 1


def _user() -> int:
    return uuid.uuid4().int % 10**15 + 1


def _order(session: Session, user_id: int, *, price: int = 250, quantity: int = 2) -> int:
    product = create_product(session, name="Widget", price=price, stock=100)
    return create_order(session, user_id, [LineRequest(product.id, quantity)]).id


def _coupon(session: Session, user_id: int, discount: int) -> int:
    coupon = create_coupon(session, name="C", discount_amount=discount, total_quantity=10)
    issue_coupon(session, coupon.id, user_id)
    return coupon.id


def _refusal(session: Session, r: PaymentRequest) -> ErrorCode:
    outcome = apply_user_requests(session, [r]).outcomes[0]
    assert isinstance(outcome, DomainError), outcome
    return outcome.code


def snapshot(session: Session, user_id: int, order_id: int | None) -> dict[str, Any]:
    """Every row a payment could touch, as plain tuples."""
    session.expire_all()

    def rows(sql: str, **params: Any) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in session.execute(text(sql), params).all()]

    return {
        "order": rows("SELECT * FROM orders WHERE id = :o", o=order_id),
        "points": rows("SELECT * FROM points WHERE user_id = :u", u=user_id),
        "histories": rows("SELECT * FROM point_histories WHERE user_id = :u", u=user_id),
        "coupons": rows("SELECT * FROM user_coupons WHERE user_id = :u", u=user_id),
        "outbox": rows("SELECT id, order_id, status FROM outbox WHERE order_id = :o", o=order_id),
    }


# ---- a payment's effects -----------------------------------------------------------


def test_a_payment_debits_completes_and_records_each_effect(db_session: Session) -> None:
    user = _user()
    charge_points(db_session, user, 5_000)
    order_id = _order(db_session, user, price=250, quantity=2)
    job_id = uuid.uuid4()

    paid = pay(db_session, user, order_id, job_id=job_id)

    assert paid == Payment(order_id, user, 500, 0, None, 4_500)
    assert paid.result() == {
        "orderId": order_id,
        "status": "COMPLETED",
        "paidAmount": 500,
        "discountAmount": 0,
        "balance": 4_500,
    }
    db_session.expire_all()
    order = db_session.get_one(Order, order_id)
    assert (order.status, order.version, order.expires_at) == ("COMPLETED", 2, None)
    assert (order.paid_amount, order.discount_amount, order.coupon_id) == (500, 0, None)
    assert order.paid_at is not None
    assert order.updated_at == order.paid_at
    assert get_balance(db_session, user).amount == 4_500
    last = db_session.execute(
        select(PointHistory).where(PointHistory.user_id == user).order_by(PointHistory.id.desc())
    ).scalars()
    payment_row = next(iter(last))
    assert (payment_row.type, payment_row.amount, payment_row.balance_after) == (
        "PAYMENT",
        500,
        4_500,
    )
    assert (payment_row.order_id, payment_row.job_id) == (order_id, job_id)
    states = db_session.execute(
        select(Outbox.status).where(Outbox.order_id == order_id).order_by(Outbox.id)
    ).scalars()
    assert list(states) == ["READY", "COMPLETED"]


def test_a_coupon_takes_its_discount_and_is_marked_used_by_the_order(db_session: Session) -> None:
    user = _user()
    charge_points(db_session, user, 1_000)
    order_id = _order(db_session, user, price=250, quantity=2)
    coupon_id = _coupon(db_session, user, discount=300)

    paid = pay(db_session, user, order_id, coupon_id)

    assert (paid.paid_amount, paid.discount_amount, paid.balance) == (200, 300, 800)
    db_session.expire_all()
    order = db_session.get_one(Order, order_id)
    assert (order.paid_amount, order.discount_amount, order.coupon_id) == (200, 300, coupon_id)
    held = db_session.execute(
        select(UserCoupon).where(UserCoupon.user_id == user, UserCoupon.coupon_id == coupon_id)
    ).scalar_one()
    assert held.order_id == order_id
    assert held.used_at == order.paid_at


def test_a_discount_above_the_total_pays_zero_and_still_writes_the_history(
    db_session: Session,
) -> None:
    user = _user()  # never charged: no points row at all
    order_id = _order(db_session, user, price=250, quantity=2)
    coupon_id = _coupon(db_session, user, discount=1_000_000)

    paid = pay(db_session, user, order_id, coupon_id)

    assert (paid.paid_amount, paid.discount_amount, paid.balance) == (0, 500, 0)
    assert get_balance(db_session, user).amount == 0
    rows = db_session.execute(
        select(PointHistory.type, PointHistory.amount, PointHistory.balance_after).where(
            PointHistory.user_id == user
        )
    ).all()
    assert [tuple(r) for r in rows] == [("PAYMENT", 0, 0)]
    assert db_session.get_one(Order, order_id).status == "COMPLETED"


def test_a_payment_ready_order_is_payable_and_stock_stays_taken(db_session: Session) -> None:
    user = _user()
    charge_points(db_session, user, 500)
    product = create_product(db_session, name="W", price=100, stock=10)
    order_id = create_order(db_session, user, [LineRequest(product.id, 3)]).id
    change_order_status(db_session, order_id, OrderStatus.PAYMENT_READY, expected_version=1)

    paid = pay(db_session, user, order_id)

    assert (paid.paid_amount, paid.balance) == (300, 200)
    db_session.expire_all()
    assert db_session.get_one(Order, order_id).version == 3
    assert get_product(db_session, product.id).stock == 7


# ---- refusals: every code, the precedence, nothing applied ---------------------------


@dataclass(frozen=True)
class Scenario:
    """A payment whose checks fail from ``first`` on: every later check fails as well."""

    first: ErrorCode
    build: Callable[[Session, int], PaymentRequest]


def _expired(session: Session, order_id: int) -> None:
    session.execute(
        update(Order)
        .where(Order.id == order_id)
        .values(expires_at=func.clock_timestamp() - text("interval '1 second'"))
    )


def _not_found(session: Session, user: int) -> PaymentRequest:
    return PaymentRequest(user, UNKNOWN_ID, UNKNOWN_ID)


def _not_owned(session: Session, user: int) -> PaymentRequest:
    order_id = _order(session, user + 1)  # someone else's, and also not payable
    change_order_status(session, order_id, OrderStatus.FAILED, expected_version=1)
    return PaymentRequest(user, order_id, UNKNOWN_ID)


def _completed(session: Session, user: int) -> PaymentRequest:
    order_id = _order(session, user)
    change_order_status(session, order_id, OrderStatus.PAYMENT_READY, expected_version=1)
    change_order_status(session, order_id, OrderStatus.COMPLETED, expected_version=2)
    return PaymentRequest(user, order_id, UNKNOWN_ID)


def _failed(session: Session, user: int) -> PaymentRequest:
    order_id = _order(session, user)
    change_order_status(session, order_id, OrderStatus.FAILED, expected_version=1)
    return PaymentRequest(user, order_id, UNKNOWN_ID)


def _expired_unmoved(session: Session, user: int) -> PaymentRequest:
    order_id = _order(session, user)
    _expired(session, order_id)  # past expiresAt, still READY (the expiry has not run)
    return PaymentRequest(user, order_id, UNKNOWN_ID)


def _coupon_missing(session: Session, user: int) -> PaymentRequest:
    return PaymentRequest(user, _order(session, user), UNKNOWN_ID)


def _coupon_of_another(session: Session, user: int) -> PaymentRequest:
    coupon_id = _coupon(session, user + 1, discount=100)  # exists, held by someone else
    return PaymentRequest(user, _order(session, user), coupon_id)


def _coupon_used(session: Session, user: int) -> PaymentRequest:
    coupon_id = _coupon(session, user, discount=100)
    pay(session, user, _order(session, user, price=50, quantity=1), coupon_id)  # free: 0 points
    return PaymentRequest(user, _order(session, user), coupon_id)


def _poor(session: Session, user: int) -> PaymentRequest:
    charge_points(session, user, 100)
    coupon_id = _coupon(session, user, discount=399)
    return PaymentRequest(user, _order(session, user, price=250, quantity=2), coupon_id)


SCENARIOS = {
    "order-not-found": Scenario(ErrorCode.ORDER_NOT_FOUND, _not_found),
    "not-owned": Scenario(ErrorCode.ORDER_NOT_OWNED, _not_owned),
    "completed": Scenario(ErrorCode.ORDER_NOT_PAYABLE, _completed),
    "failed": Scenario(ErrorCode.ORDER_NOT_PAYABLE, _failed),
    "expired-not-yet-failed": Scenario(ErrorCode.ORDER_NOT_PAYABLE, _expired_unmoved),
    "coupon-does-not-exist": Scenario(ErrorCode.COUPON_NOT_OWNED, _coupon_missing),
    "coupon-of-another-user": Scenario(ErrorCode.COUPON_NOT_OWNED, _coupon_of_another),
    "coupon-used": Scenario(ErrorCode.COUPON_ALREADY_USED, _coupon_used),
    "insufficient-points": Scenario(ErrorCode.INSUFFICIENT_POINTS, _poor),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_each_refusal_reports_its_code_first_and_changes_nothing(
    db_session: Session, name: str
) -> None:
    """The scenarios also fail every later check (no points, a foreign or used coupon),
    so each proves its code beats those after it in API.md's list."""
    scenario = SCENARIOS[name]
    user = _user()
    request = scenario.build(db_session, user)
    before = snapshot(db_session, user, request.order_id)

    assert _refusal(db_session, request) == scenario.first

    assert snapshot(db_session, user, request.order_id) == before


def test_precedence_scenarios_fail_every_later_check_too(db_session: Session) -> None:
    """The table above is a precedence test only if each scenario's later checks fail too:
    fixing the first failing condition must surface the next code (down to INSUFFICIENT_POINTS)."""
    user = _user()
    coupon_id = _coupon(db_session, user, discount=100)
    pay(db_session, user, _order(db_session, user, price=50, quantity=1), coupon_id)
    used = coupon_id
    order_id = _order(db_session, user, price=250, quantity=2)
    chain = [
        (PaymentRequest(user, UNKNOWN_ID, UNKNOWN_ID), ErrorCode.ORDER_NOT_FOUND),
        (PaymentRequest(user + 1, order_id, UNKNOWN_ID), ErrorCode.ORDER_NOT_OWNED),
        (PaymentRequest(user, order_id, UNKNOWN_ID), ErrorCode.COUPON_NOT_OWNED),
        (PaymentRequest(user, order_id, used), ErrorCode.COUPON_ALREADY_USED),
        (PaymentRequest(user, order_id, None), ErrorCode.INSUFFICIENT_POINTS),
    ]
    for request, code in chain:
        assert _refusal(db_session, request) == code, request
    _expired(db_session, order_id)
    assert _refusal(db_session, PaymentRequest(user, order_id, UNKNOWN_ID)) == (
        ErrorCode.ORDER_NOT_PAYABLE
    )


def test_a_refusal_in_a_batch_leaves_the_other_jobs_applied(db_session: Session) -> None:
    user = _user()
    order_id = _order(db_session, user, price=100, quantity=1)
    outcomes = apply_user_requests(
        db_session,
        [
            PointRequest(user, PointChange.CHARGE, 50),
            PaymentRequest(user, order_id),  # 100 > 50
            PointRequest(user, PointChange.CHARGE, 50),
            PaymentRequest(user, order_id),  # now covered
        ],
    ).outcomes
    assert outcomes[0] == Balance(user, 50)
    assert isinstance(outcomes[1], DomainError)
    assert outcomes[1].code is ErrorCode.INSUFFICIENT_POINTS
    assert outcomes[2] == Balance(user, 100)
    assert outcomes[3] == Payment(order_id, user, 100, 0, None, 0)
    rows = db_session.execute(
        select(PointHistory.type, PointHistory.balance_after)
        .where(PointHistory.user_id == user)
        .order_by(PointHistory.id)
    ).all()
    assert [tuple(r) for r in rows] == [("CHARGE", 50), ("CHARGE", 100), ("PAYMENT", 0)]


# ---- the order of a batch ---------------------------------------------------------------


def test_a_charge_before_a_payment_in_the_batch_funds_it_and_a_use_after_sees_the_debit(
    db_session: Session,
) -> None:
    user = _user()
    order_id = _order(db_session, user, price=300, quantity=1)
    outcomes = apply_user_requests(
        db_session,
        [
            PointRequest(user, PointChange.CHARGE, 400),
            PaymentRequest(user, order_id),
            PointRequest(user, PointChange.USE, 101),
            PointRequest(user, PointChange.USE, 100),
        ],
    ).outcomes
    assert outcomes[1] == Payment(order_id, user, 300, 0, None, 100)
    assert isinstance(outcomes[2], DomainError)
    assert outcomes[2].code is ErrorCode.INSUFFICIENT_POINTS
    assert outcomes[3] == Balance(user, 0)
    assert get_balance(db_session, user).amount == 0


def test_two_payments_of_one_order_in_a_batch_debit_once(db_session: Session) -> None:
    user = _user()
    charge_points(db_session, user, 10_000)
    order_id = _order(db_session, user, price=100, quantity=3)
    applied = apply_user_requests(db_session, [PaymentRequest(user, order_id)] * 5)
    assert applied.orders_completed
    assert applied.outcomes[0] == Payment(order_id, user, 300, 0, None, 9_700)
    assert [o.code for o in applied.outcomes[1:] if isinstance(o, DomainError)] == [
        ErrorCode.ORDER_NOT_PAYABLE
    ] * 4
    assert get_balance(db_session, user).amount == 9_700
    debits = db_session.execute(
        select(func.count()).where(PointHistory.order_id == order_id)
    ).scalar_one()
    assert debits == 1


def test_one_coupon_for_two_orders_in_a_batch_pays_one(db_session: Session) -> None:
    user = _user()
    charge_points(db_session, user, 10_000)
    first, second = _order(db_session, user), _order(db_session, user)
    coupon_id = _coupon(db_session, user, discount=200)
    outcomes = apply_user_requests(
        db_session,
        [PaymentRequest(user, first, coupon_id), PaymentRequest(user, second, coupon_id)],
    ).outcomes
    assert outcomes[0] == Payment(first, user, 300, 200, coupon_id, 9_700)
    assert isinstance(outcomes[1], DomainError)
    assert outcomes[1].code is ErrorCode.COUPON_ALREADY_USED
    db_session.expire_all()
    assert db_session.get_one(Order, second).status == "READY"  # refused whole, not paid plain


def test_a_batch_without_payments_takes_no_order_locks(db_session: Session) -> None:
    user = _user()
    applied = apply_user_requests(db_session, [PointRequest(user, PointChange.CHARGE, 5)])
    assert applied.outcomes == [Balance(user, 5)]
    assert not applied.orders_completed


def test_payment_batches_of_any_size_run_the_same_statements(db_session: Session) -> None:
    """The batch's rows travel as array parameters: a batch of three payments with coupons
    runs the very statements a batch of one does (compiled and converted once)."""

    def statements_of(payments: int) -> list[str]:
        user = _user()
        charge_points(db_session, user, 10_000)
        requests = [
            PaymentRequest(user, _order(db_session, user), _coupon(db_session, user, discount=10))
            for _ in range(payments)
        ]
        seen: list[str] = []

        def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            seen.append(statement)

        engine = db_session.get_bind()
        event.listen(engine, "before_cursor_execute", record)
        try:
            outcomes = apply_user_requests(db_session, requests).outcomes
        finally:
            event.remove(engine, "before_cursor_execute", record)
        assert all(isinstance(o, Payment) for o in outcomes), outcomes
        return [s for s in seen if s.lstrip().upper().startswith("UPDATE")]

    one, three = statements_of(1), statements_of(3)
    assert len(one) == 3  # the balances, the orders, the user coupons
    assert three == one


# ---- the constraints that back the rule --------------------------------------------------


def test_the_schema_refuses_a_second_debit_of_an_order(db_session: Session) -> None:
    user = _user()
    order_id = _order(db_session, user)
    row = {"user_id": user, "type": "PAYMENT", "amount": 0, "balance_after": 0}
    db_session.execute(insert(PointHistory).values(order_id=order_id, **row))
    with (
        pytest.raises(IntegrityError, match="uq_point_history_keys_order_id"),
        db_session.begin_nested(),
    ):
        db_session.execute(insert(PointHistory).values(order_id=order_id, **row))
    with (
        pytest.raises(IntegrityError, match="ck_point_histories_payment_has_order"),
        db_session.begin_nested(),
    ):
        db_session.execute(insert(PointHistory).values(order_id=None, **row))


def test_the_schema_refuses_a_payment_that_does_not_add_up(db_session: Session) -> None:
    order_id = _order(db_session, _user(), price=250, quantity=2)
    with (
        pytest.raises(IntegrityError, match="ck_orders_payment_adds_up"),
        db_session.begin_nested(),
    ):
        db_session.execute(
            update(Order)
            .where(Order.id == order_id)
            .values(
                status="COMPLETED",
                paid_amount=400,
                discount_amount=0,
                paid_at=func.now(),
            )
        )


def test_the_schema_refuses_a_coupon_used_by_two_orders(db_session: Session) -> None:
    user = _user()
    first, second = _order(db_session, user), _order(db_session, user)
    one = _coupon(db_session, user, discount=1)
    two = _coupon(db_session, user, discount=1)
    used = {"used_at": func.now(), "order_id": first}
    db_session.execute(
        update(UserCoupon)
        .where(UserCoupon.coupon_id == one, UserCoupon.user_id == user)
        .values(used)
    )
    with pytest.raises(IntegrityError, match="uq_user_coupons_order_id"), db_session.begin_nested():
        db_session.execute(
            update(UserCoupon)
            .where(UserCoupon.coupon_id == two, UserCoupon.user_id == user)
            .values(used)
        )
    with (
        pytest.raises(IntegrityError, match="ck_user_coupons_used_by_an_order"),
        db_session.begin_nested(),
    ):
        db_session.execute(
            update(UserCoupon)
            .where(UserCoupon.coupon_id == two, UserCoupon.user_id == user)
            .values(order_id=second)
        )


def test_a_payment_never_overdraws_even_past_the_rule(db_session: Session) -> None:
    user = _user()
    charge_points(db_session, user, 10)
    with (
        pytest.raises(IntegrityError, match="ck_points_balance_non_negative"),
        db_session.begin_nested(),
    ):
        db_session.execute(
            update(PointBalance).where(PointBalance.user_id == user).values(balance=-1)
        )
