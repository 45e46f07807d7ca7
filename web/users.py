"""A user's coupons."""

from __future__ import annotations

from flask import Blueprint, Response

from shared.domain.coupons import list_user_coupons
from web.api import operation
from web.render import render, user_coupon_item
from web.schemas import UserCouponList
from web.session import primary_read_session

bp = Blueprint("users", __name__, url_prefix="/v1/users")


@operation(
    bp,
    "/<id:user_id>/coupons",
    "GET",
    summary="A user's coupons, in the order issued",
    customer=True,
    responses={200: UserCouponList},
)
def get_user_coupons(user_id: int) -> Response:
    rows = list_user_coupons(primary_read_session(), user_id)
    return render(UserCouponList(items=[user_coupon_item(uc, c) for uc, c in rows]))
