"""Response bodies built from the response schemas (camelCase only through aliases)."""

from __future__ import annotations

from flask import Response, jsonify
from pydantic import BaseModel

from shared.formats import rfc3339
from shared.models import Coupon, Order, OrderLine, UserCoupon
from web import schemas


def render(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    response = jsonify(model.model_dump(mode="json", by_alias=True))
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def order_view(order: Order, lines: list[OrderLine]) -> schemas.OrderView:
    return schemas.OrderView(
        id=order.id,
        user_id=order.user_id,
        status=order.status,
        version=order.version,
        total_price=order.total_price,
        order_lines=[
            schemas.OrderLineView(
                product_id=line.product_id, quantity=line.quantity, unit_price=line.unit_price
            )
            for line in lines
        ],
        created_at=rfc3339(order.created_at),
        updated_at=rfc3339(order.updated_at),
    )


def coupon_view(coupon: Coupon) -> schemas.CouponView:
    return schemas.CouponView(
        id=coupon.id,
        name=coupon.name,
        discount_amount=coupon.discount_amount,
        total_quantity=coupon.total_quantity,
        issued_quantity=coupon.issued_quantity,
        remaining=coupon.total_quantity - coupon.issued_quantity,
    )


def user_coupon_item(user_coupon: UserCoupon, coupon: Coupon) -> schemas.UserCouponItem:
    return schemas.UserCouponItem(
        user_coupon_id=user_coupon.id,
        coupon_id=coupon.id,
        name=coupon.name,
        discount_amount=coupon.discount_amount,
        issued_at=rfc3339(user_coupon.issued_at),
    )
