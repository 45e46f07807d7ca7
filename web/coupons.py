"""Coupons: created and read here; issuing is a job on the coupon's partition."""

from __future__ import annotations

from flask import Blueprint, Response

from shared.domain.coupons import create_coupon, get_coupon
from shared.jobs import JobKind
from web.api import operation, query_or_body
from web.identity import token_user
from web.publish import accept_job
from web.render import coupon_view, render
from web.schemas import CouponCreate, CouponView, IssueBody, IssueQuery, JobAccepted
from web.session import db_session, primary_read_session

bp = Blueprint("coupons", __name__, url_prefix="/v1/coupons")


@operation(
    bp,
    "",
    "POST",
    summary="Create a coupon (admin)",
    body=CouponCreate,
    responses={201: CouponView},
    headers={201: {"Location": "the new resource"}},
    admin=True,
)
def post_coupon(body: CouponCreate) -> Response:
    session = db_session()
    coupon = create_coupon(
        session,
        name=body.name,
        discount_amount=body.discount_amount,
        total_quantity=body.total_quantity,
    )
    session.commit()
    return render(coupon_view(coupon), 201, headers={"Location": f"/v1/coupons/{coupon.id}"})


@operation(
    bp,
    "/<id:coupon_id>",
    "GET",
    summary="A coupon with issuedQuantity and remaining",
    responses={200: CouponView},
)
def get_coupon_by_id(coupon_id: int) -> Response:
    return render(coupon_view(get_coupon(primary_read_session(), coupon_id)))


@operation(
    bp,
    "/<id:coupon_id>/issue",
    "POST",
    summary="Issue the coupon to a user (job COUPON_ISSUE on the coupon's partition)",
    query=IssueQuery,
    body=IssueBody,
    body_optional=True,
    responses={202: JobAccepted},
    customer=True,
    rate_limited=True,
    job=True,
)
def post_issue(coupon_id: int, query: IssueQuery, body: IssueBody | None) -> Response:
    user_id = query_or_body(
        "userId", query.user_id, body.user_id if body else None, default=token_user()
    )
    return accept_job(JobKind.COUPON_ISSUE, {"couponId": coupon_id, "userId": user_id})
