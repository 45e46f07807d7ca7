"""Paying an order with points and at most one coupon (API.md, Payment).

A payment is a job on the paying user's partition, applied in the same batches as
that user's charges and uses and decided in order with them (a charge committed
before a payment funds it).  The order itself lives on a product partition, so the
queue cannot serialize a payment with an admin status change or the expiry; the
database does (ARCHITECTURE rule 2):

* the balances (``PointBook``), then the orders and the users' coupons a batch pays
  with are locked ``FOR UPDATE`` in ascending id order before anything is decided,
  so whichever of a payment, ``PUT .../status`` and the expiry locks the order row
  first wins, and the others see the order it left;
* each paid order is moved by one conditional UPDATE checking its state, version
  and expiry; each coupon is used by one conditional UPDATE ``WHERE used_at IS
  NULL``; ``uq_point_history_keys_order_id`` allows one debit per order,
  ``uq_user_coupons_order_id`` one coupon per order, ``ck_orders_payment_adds_up``
  a payment that adds up, ``ck_points_balance_non_negative`` no overdraft.

Under the locks those guards never refuse; if one ever did, the batch raises and
rolls back whole (nothing of it is applied) and is replayed one job at a time.
A refused payment is decided before anything is written, so nothing of it exists.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import BigInteger, Table, bindparam, func, insert, select, tuple_, update
from sqlalchemy.orm import Session

from shared.domain.batch_rows import batch_keys, rows_params, unnest_rows
from shared.domain.errors import (
    CouponAlreadyUsed,
    CouponNotOwned,
    DomainError,
    InsufficientPoints,
    OrderNotFound,
    OrderNotOwned,
    OrderNotPayable,
    unwrap,
)
from shared.domain.orders import PAYABLE, OrderStatus
from shared.domain.points import Balance, PointBook, PointChange, PointRequest
from shared.models import Coupon, Order, Outbox, UserCoupon


@dataclass(frozen=True)
class PaymentRequest:
    user_id: int
    order_id: int
    coupon_id: int | None = None  # the coupon's id (not the user coupon's)
    job_id: uuid.UUID | None = None


@dataclass(frozen=True)
class Payment:
    order_id: int
    user_id: int
    paid_amount: int
    discount_amount: int
    coupon_id: int | None
    balance: int  # the user's balance after the debit

    def result(self) -> dict[str, Any]:
        """The ORDER_PAY job's result (API.md)."""
        return {
            "orderId": self.order_id,
            "status": OrderStatus.COMPLETED.value,
            "paidAmount": self.paid_amount,
            "discountAmount": self.discount_amount,
            "balance": self.balance,
        }


@dataclass
class _LockedOrder:
    id: int
    user_id: int
    status: OrderStatus  # as decided so far in this batch
    version: int  # as read under the lock (the guard of the write)
    total_price: int
    expires_at: dt.datetime | None


@dataclass
class _LockedCoupon:
    user_coupon_id: int
    discount_amount: int
    used: bool  # as decided so far in this batch


@dataclass(frozen=True)
class _Completion:
    order_id: int
    version: int
    paid_amount: int
    discount_amount: int
    coupon_id: int | None
    user_coupon_id: int | None


class PaymentDesk:
    """The orders and user coupons one batch of payments names, locked, and the
    completions decided against them (written once by ``write``)."""

    def __init__(self, session: Session, requests: list[PaymentRequest]) -> None:
        self._session = session
        order_ids = sorted({r.order_id for r in requests})
        self._orders = {
            row.id: _LockedOrder(
                row.id,
                row.user_id,
                OrderStatus(row.status),
                row.version,
                row.total_price,
                row.expires_at,
            )
            for row in session.execute(
                select(
                    Order.id,
                    Order.user_id,
                    Order.status,
                    Order.version,
                    Order.total_price,
                    Order.expires_at,
                )
                .where(Order.id.in_(order_ids))
                .order_by(Order.id)
                .with_for_update()
            )
        }
        held = sorted({(r.user_id, r.coupon_id) for r in requests if r.coupon_id is not None})
        self._coupons: dict[tuple[int, int], _LockedCoupon] = {}
        if held:
            # Only the user's coupon rows are locked, not the coupon (its issues go on).
            for row in session.execute(
                select(
                    UserCoupon.id,
                    UserCoupon.user_id,
                    UserCoupon.coupon_id,
                    UserCoupon.used_at,
                    Coupon.discount_amount,
                )
                .join(Coupon, Coupon.id == UserCoupon.coupon_id)
                .where(tuple_(UserCoupon.user_id, UserCoupon.coupon_id).in_(held))
                .order_by(UserCoupon.id)
                .with_for_update(of=UserCoupon)
            ):
                self._coupons[(row.user_id, row.coupon_id)] = _LockedCoupon(
                    row.id, row.discount_amount, row.used_at is not None
                )
        # Read after the locks are held: "not past its expiresAt" is judged at this
        # moment, which the order's conditional UPDATE checks again.
        self.at: dt.datetime = session.execute(select(func.clock_timestamp())).scalar_one()
        self._completions: list[_Completion] = []

    def order(self, order_id: int) -> _LockedOrder | None:
        return self._orders.get(order_id)

    def coupon(self, user_id: int, coupon_id: int) -> _LockedCoupon | None:
        return self._coupons.get((user_id, coupon_id))

    def complete(
        self,
        order: _LockedOrder,
        *,
        paid_amount: int,
        discount_amount: int,
        coupon_id: int | None,
        coupon: _LockedCoupon | None,
    ) -> None:
        order.status = OrderStatus.COMPLETED
        if coupon is not None:
            coupon.used = True
        self._completions.append(
            _Completion(
                order.id,
                order.version,
                paid_amount,
                discount_amount,
                coupon_id,
                coupon.user_coupon_id if coupon else None,
            )
        )

    @property
    def completed(self) -> bool:
        return bool(self._completions)

    def write(self) -> None:
        """Every completion: the orders by one conditional UPDATE, the coupons by one, and
        an outbox row each (the history listener writes the COMPLETED history row)."""
        if not self._completions:
            return
        paid = [
            (c.order_id, c.version, c.paid_amount, c.discount_amount, c.coupon_id or 0)
            for c in self._completions
        ]
        moved = self._session.execute(
            _COMPLETE_ORDERS,
            {"at": self.at, **rows_params("paid", paid, _PAID_COLUMNS)},
        ).scalars()
        _guard("orders", {c.order_id for c in self._completions}, set(moved))
        uses = [
            (c.user_coupon_id, c.order_id)
            for c in self._completions
            if c.user_coupon_id is not None
        ]
        if uses:
            marked = self._session.execute(
                _USE_COUPONS, {"at": self.at, **rows_params("used", uses, ("id", "order_id"))}
            ).scalars()
            _guard("user coupons", {user_coupon for user_coupon, _ in uses}, set(marked))
        self._session.execute(
            insert(Outbox),
            [
                {"order_id": c.order_id, "status": OrderStatus.COMPLETED.value}
                for c in self._completions
            ],
        )


# The batch's statements, built once (Core tables, not the ORM's bulk UPDATE path).
_orders = cast(Table, Order.__table__)
_user_coupons = cast(Table, UserCoupon.__table__)
_PAID_COLUMNS = ("id", "version", "paid", "discount", "coupon")
_PAID = unnest_rows("paid", **dict.fromkeys(_PAID_COLUMNS, BigInteger()))
_COMPLETE_ORDERS = (
    update(_orders)
    .where(
        _orders.c.id == batch_keys("paid", "id", BigInteger()),
        _orders.c.id == _PAID.c.id,
        _orders.c.version == _PAID.c.version,
        _orders.c.status.in_([s.value for s in PAYABLE]),
        _orders.c.expires_at.is_(None) | (_orders.c.expires_at > bindparam("at")),
    )
    .values(
        status=OrderStatus.COMPLETED.value,
        version=_orders.c.version + 1,
        expires_at=None,
        paid_amount=_PAID.c.paid,
        discount_amount=_PAID.c.discount,
        coupon_id=func.nullif(_PAID.c.coupon, 0),
        paid_at=bindparam("at"),
        updated_at=bindparam("at"),
    )
    .returning(_orders.c.id)
)
_USED = unnest_rows("used", id=BigInteger(), order_id=BigInteger())
_USE_COUPONS = (
    update(_user_coupons)
    .where(
        _user_coupons.c.id == batch_keys("used", "id", BigInteger()),
        _user_coupons.c.id == _USED.c.id,
        _user_coupons.c.used_at.is_(None),
    )
    .values(used_at=bindparam("at"), order_id=_USED.c.order_id)
    .returning(_user_coupons.c.id)
)


def _guard(what: str, wanted: set[Any], changed: set[Any]) -> None:
    if changed != wanted:
        # The rows were locked: a mismatch means something bypassed the lock. Roll back.
        raise RuntimeError(f"{what} {sorted(wanted - changed)} changed under their lock")


def pay_order(  # noqa: PLR0911 (one return per refusal, in API.md's order)
    book: PointBook, desk: PaymentDesk, r: PaymentRequest
) -> Payment | DomainError:
    """The payment rule: API.md's checks in its order, then the payment's effects.

    Refusals, the first that applies: ``OrderNotFound``; ``OrderNotOwned`` (another
    user's order); ``OrderNotPayable`` (not READY or PAYMENT_READY, or past its
    ``expiresAt`` even if the expiry has not moved it to FAILED yet); with a coupon,
    ``CouponNotOwned`` (the user holds no such coupon, or it does not exist) and
    ``CouponAlreadyUsed``; ``InsufficientPoints`` (the balance, after the batch's
    earlier jobs, does not cover ``paidAmount``).  A refusal records nothing.

    ``discountAmount = min(coupon's discountAmount, totalPrice)`` (0 without a
    coupon) and ``paidAmount = totalPrice - discountAmount``.  Accepted, it debits
    ``paidAmount`` (a PAYMENT history row naming the order, even for 0), marks the
    coupon used by this order and completes the order (version + 1, an outbox row),
    recorded in ``book`` and ``desk`` and written by their ``write()``.
    """
    order = desk.order(r.order_id)
    if order is None:
        return OrderNotFound(f"order {r.order_id} does not exist")
    if order.user_id != r.user_id:
        return OrderNotOwned(f"order {r.order_id} is not an order of user {r.user_id}")
    if order.status not in PAYABLE:
        return OrderNotPayable(f"order {r.order_id} is {order.status.value}")
    if order.expires_at is not None and order.expires_at <= desk.at:
        return OrderNotPayable(f"order {r.order_id} expired unpaid")
    coupon = None
    if r.coupon_id is not None:
        coupon = desk.coupon(r.user_id, r.coupon_id)
        if coupon is None:
            return CouponNotOwned(f"user {r.user_id} holds no coupon {r.coupon_id}")
        if coupon.used:
            return CouponAlreadyUsed(f"coupon {r.coupon_id} of user {r.user_id} was used")
    discount = min(coupon.discount_amount, order.total_price) if coupon else 0
    paid = order.total_price - discount
    if book.balance(r.user_id) < paid:
        return InsufficientPoints(f"user {r.user_id} has fewer than {paid} points")
    balance = book.debit_payment(r.user_id, paid, order_id=order.id, job_id=r.job_id)
    desk.complete(
        order, paid_amount=paid, discount_amount=discount, coupon_id=r.coupon_id, coupon=coupon
    )
    return Payment(order.id, r.user_id, paid, discount, r.coupon_id, balance)


UserRequest = PointRequest | PaymentRequest
UserOutcome = Balance | Payment | DomainError


@dataclass(frozen=True)
class UserOutcomes:
    outcomes: list[UserOutcome]
    orders_completed: bool  # outbox rows were written (wake the history listener)


def apply_user_requests(session: Session, requests: list[UserRequest]) -> UserOutcomes:
    """A user partition's batch: charges, uses and payments decided in order, written once.

    Locks the balances (``PointBook``), then the paid orders and coupons
    (``PaymentDesk``), decides each request in turn against them (``PointBook.change``,
    ``pay_order``), then writes: each balance's net delta and the history rows, the
    completed orders, the used coupons and the outbox rows.  One outcome per request.
    """
    payments = [r for r in requests if isinstance(r, PaymentRequest)]
    book = PointBook(
        session,
        (r.user_id for r in requests),
        create=(
            r.user_id
            for r in requests
            if isinstance(r, PointRequest) and r.change is PointChange.CHARGE
        ),
    )
    desk = PaymentDesk(session, payments) if payments else None
    outcomes: list[UserOutcome] = []
    for r in requests:
        if isinstance(r, PointRequest):
            outcomes.append(book.change(r))
        else:
            assert desk is not None
            outcomes.append(pay_order(book, desk, r))
    book.write()
    if desk is not None:
        desk.write()
    return UserOutcomes(outcomes, desk is not None and desk.completed)


def pay(
    session: Session,
    user_id: int,
    order_id: int,
    coupon_id: int | None = None,
    *,
    job_id: uuid.UUID | None = None,
) -> Payment:
    """Pay one order (a batch of one).  Raises as ``pay_order`` refuses."""
    outcome = apply_user_requests(
        session, [PaymentRequest(user_id, order_id, coupon_id, job_id)]
    ).outcomes[0]
    paid = unwrap(outcome)
    assert isinstance(paid, Payment)
    return paid
