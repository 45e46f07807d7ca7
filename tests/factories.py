"""factory_boy factories, one per model, bound to the test session by ``bind_factories``.

Rows are flushed on create (``sqlalchemy_session_persistence = "flush"``), so they
are visible to the app under test, which shares the test's connection, and are
rolled back with the test's outer transaction.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import factory
from factory.alchemy import SQLAlchemyModelFactory
from sqlalchemy.orm import Session

from shared.domain.orders import OrderStatus
from shared.models import (
    Coupon,
    Order,
    OrderHistory,
    OrderLine,
    PointBalance,
    PointHistory,
    Product,
    UserCoupon,
)


class _Base(SQLAlchemyModelFactory):  # type: ignore[misc]  # factory_boy is untyped
    class Meta:
        abstract = True
        sqlalchemy_session = None  # set by bind_factories()
        sqlalchemy_session_persistence = "flush"


class ProductFactory(_Base):
    class Meta:
        model = Product

    name = factory.Sequence(lambda n: f"product {n}")
    price = 1_000
    stock = 10


class CouponFactory(_Base):
    class Meta:
        model = Coupon

    name = factory.Sequence(lambda n: f"coupon {n}")
    discount_amount = 500
    total_quantity = 10


class PointBalanceFactory(_Base):
    class Meta:
        model = PointBalance

    user_id = factory.Sequence(lambda n: 9_000_000_000 + n)
    balance = 0


class PointHistoryFactory(_Base):
    class Meta:
        model = PointHistory

    type = "CHARGE"
    amount = 100
    balance_after = 100


class UserCouponFactory(_Base):
    class Meta:
        model = UserCoupon


class OrderLineFactory(_Base):
    class Meta:
        model = OrderLine

    quantity = 1
    unit_price = 1_000


class OrderFactory(_Base):
    """An order; ``lines=[(product, quantity), ...]`` adds its lines and sets the total.

    It writes rows only: it does not take stock (a test that cares sets the
    product's stock as if the order had taken it).
    """

    class Meta:
        model = Order

    user_id = factory.Sequence(lambda n: 8_000_000_000 + n)
    status = OrderStatus.READY.value
    total_price = 0

    @factory.post_generation  # type: ignore[misc]  # factory_boy is untyped
    def lines(
        self: Order, create: bool, extracted: Sequence[tuple[Product, int]] | None, **_: Any
    ) -> None:
        if not create or not extracted:
            return
        for product, quantity in extracted:
            OrderLineFactory(
                order_id=self.id,
                product_id=product.id,
                quantity=quantity,
                unit_price=product.price,
            )
        self.total_price = sum(product.price * quantity for product, quantity in extracted)
        session = OrderFactory._meta.sqlalchemy_session
        session.flush()


class OrderHistoryFactory(_Base):
    """A history row as the listener writes it (``created_at`` is set by the caller)."""

    class Meta:
        model = OrderHistory


ALL_FACTORIES: tuple[type[_Base], ...] = (
    ProductFactory,
    CouponFactory,
    PointBalanceFactory,
    PointHistoryFactory,
    UserCouponFactory,
    OrderLineFactory,
    OrderFactory,
    OrderHistoryFactory,
)


@contextmanager
def bind_factories(session: Session) -> Iterator[None]:
    """Every factory creates its rows in ``session`` for the duration."""
    for f in ALL_FACTORIES:
        f._meta.sqlalchemy_session = session
    try:
        yield
    finally:
        for f in ALL_FACTORIES:
            f._meta.sqlalchemy_session = None
