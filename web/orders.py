"""Orders: creation is a job; status changes are synchronous under an optimistic lock."""

from __future__ import annotations

import logging
import re

from flask import Blueprint, Response, current_app, request
from werkzeug.exceptions import NotFound

from shared.cache import ProductCache
from shared.domain.orders import (
    change_order_status,
    get_order,
    list_order_histories,
    order_owner,
)
from shared.domain.products import get_products, product_document
from shared.formats import rfc3339
from shared.jobs import JobKind
from shared.partitions import HISTORY_QUEUE
from web.api import operation
from web.errors import validation_error
from web.identity import current_identity, may_read
from web.publish import Publisher, accept_job
from web.render import order_view, render
from web.schemas import (
    ErrorBody,
    JobAccepted,
    OrderCreate,
    OrderHistoryItem,
    OrderHistoryList,
    OrderStatusView,
    OrderView,
    PaymentBody,
    StatusQuery,
)
from web.session import ORDER_HISTORY_MAX_LAG, db_session, lagging_read, primary_read_session

log = logging.getLogger(__name__)

bp = Blueprint("orders", __name__, url_prefix="/v1/orders")

_IF_MATCH = re.compile(r'^"?([0-9]+)"?$')
IF_MATCH_HEADER = {
    "name": "If-Match",
    "in": "header",
    "required": False,
    "description": "The version the change is based on (bare or quoted); stale: 409",
    "schema": {"type": "string", "pattern": '^ *(?:[0-9]{1,18}|"[0-9]{1,18}") *$'},
}


@operation(
    bp,
    "",
    "POST",
    summary="Place an order (job ORDER_CREATE on the partition of its smallest product id)",
    body=OrderCreate,
    responses={202: JobAccepted},
    customer=True,
    rate_limited=True,
    job=True,
)
def post_order(body: OrderCreate) -> Response:
    return accept_job(JobKind.ORDER_CREATE, body.model_dump(by_alias=True))


@operation(
    bp,
    "/<id:order_id>/payment",
    "POST",
    summary="Pay an order with points and at most one coupon (job ORDER_PAY on the user's"
    " partition)",
    body=PaymentBody,
    responses={202: JobAccepted},
    customer=True,
    rate_limited=True,
    job=True,
)
def post_payment(order_id: int, body: PaymentBody) -> Response:
    # Left out, couponId is absent from the job (and from the Idempotency-Key fingerprint).
    return accept_job(
        JobKind.ORDER_PAY,
        {"orderId": order_id, **body.model_dump(by_alias=True, exclude_none=True)},
    )


@operation(
    bp,
    "/<id:order_id>",
    "GET",
    summary="An order with its lines; ETag is its version",
    responses={200: OrderView},
    headers={200: {"ETag": "the order's version, quoted"}},
    customer=True,
)
def get_order_by_id(order_id: int) -> Response:
    order, lines = get_order(primary_read_session(), order_id)
    if not may_read(order.user_id):
        raise NotFound()  # another user's order: exactly as an unknown id (API.md)
    return render(order_view(order, lines), headers={"ETag": f'"{order.version}"'})


def _expected_version() -> int | None:
    header = request.headers.get("If-Match")
    if header is None:
        return None
    match = _IF_MATCH.match(header.strip())
    if not match or (header.strip().startswith('"') != header.strip().endswith('"')):
        raise validation_error(
            [{"field": "If-Match", "message": "must be a version number, bare or quoted"}]
        )
    return int(match.group(1))


@operation(
    bp,
    "/<id:order_id>/status",
    "PUT",
    summary="Move an order to another state (admin); 409 on a stale version or forbidden move",
    query=StatusQuery,
    responses={200: OrderStatusView, 409: ErrorBody},
    headers={200: {"ETag": "the order's new version, quoted"}},
    admin=True,
    header_parameters=(IF_MATCH_HEADER,),
)
def put_order_status(order_id: int, query: StatusQuery) -> Response:
    expected = _expected_version()
    session = db_session()
    order, restocked = change_order_status(
        session, order_id, query.status, expected_version=expected
    )
    session.commit()
    _after_status_change(restocked)
    return render(
        OrderStatusView(order_id=order.id, status=order.status, version=order.version),
        headers={"ETag": f'"{order.version}"'},
    )


def _after_status_change(restocked: list[int]) -> None:
    """After commit: refresh the cache of restocked products and wake the history listener."""
    cache: ProductCache = current_app.extensions["product_cache"]
    if restocked:
        for product in get_products(db_session(), restocked):
            cache.refresh_product(product_document(product), product.version)
        cache.invalidate_listings()
    publisher: Publisher = current_app.extensions["publisher"]
    try:
        publisher.wake(HISTORY_QUEUE)
    except Exception as exc:
        log.warning("history wake-up not sent (relay will): %s", exc)


@operation(
    bp,
    "/<id:order_id>/histories",
    "GET",
    summary="The states an order entered, in order",
    responses={200: OrderHistoryList},
    customer=True,
)
def get_order_histories(order_id: int) -> Response:
    if current_identity() is not None and not may_read(
        order_owner(primary_read_session(), order_id)
    ):
        raise NotFound()  # another user's order (or none): exactly as an unknown id
    rows, _ = lagging_read(
        lambda s: list_order_histories(s, order_id), max_lag=ORDER_HISTORY_MAX_LAG
    )
    items = [OrderHistoryItem(status=r.status, created_at=rfc3339(r.created_at)) for r in rows]
    return render(OrderHistoryList(items=items))
