"""Points: charge and use are jobs on the user's partition; reads are direct."""

from __future__ import annotations

from flask import Blueprint, Response

from shared.domain.points import get_balance, list_point_histories
from shared.formats import rfc3339
from shared.jobs import JobKind
from web.api import operation
from web.publish import accept_job
from web.render import render
from web.schemas import BalanceView, JobAccepted, Page, PageQuery, PointHistoryItem, PointsRequest
from web.session import primary_read_session

bp = Blueprint("points", __name__, url_prefix="/v1/points")


@operation(
    bp,
    "/charge",
    "POST",
    summary="Charge points (job POINTS_CHARGE on the user's partition)",
    body=PointsRequest,
    responses={202: JobAccepted},
    customer=True,
    rate_limited=True,
    job=True,
)
def post_charge(body: PointsRequest) -> Response:
    return accept_job(JobKind.POINTS_CHARGE, body.model_dump(by_alias=True))


@operation(
    bp,
    "/use",
    "POST",
    summary="Use points (job POINTS_USE on the user's partition)",
    body=PointsRequest,
    responses={202: JobAccepted},
    customer=True,
    rate_limited=True,
    job=True,
)
def post_use(body: PointsRequest) -> Response:
    return accept_job(JobKind.POINTS_USE, body.model_dump(by_alias=True))


@operation(
    bp,
    "/<id:user_id>",
    "GET",
    summary="A user's balance (0 if never charged)",
    customer=True,
    responses={200: BalanceView},
)
def get_points(user_id: int) -> Response:
    balance = get_balance(primary_read_session(), user_id)
    return render(BalanceView(user_id=balance.user_id, amount=balance.amount))


@operation(
    bp,
    "/<id:user_id>/histories",
    "GET",
    summary="A user's point changes, newest first",
    customer=True,
    query=PageQuery,
    responses={200: Page[PointHistoryItem]},
)
def get_point_histories(user_id: int, query: PageQuery) -> Response:
    rows, total = list_point_histories(
        primary_read_session(), user_id, page=query.page, size=query.size
    )
    items = [
        PointHistoryItem(
            type=r.type,
            amount=r.amount,
            balance_after=r.balance_after,
            order_id=r.order_id,
            created_at=rfc3339(r.created_at),
        )
        for r in rows
    ]
    return render(
        Page[PointHistoryItem](items=items, page=query.page, size=query.size, total=total)
    )
