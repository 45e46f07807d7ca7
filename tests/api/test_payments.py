"""POST /v1/orders/{id}/payment over the Flask client, applied by the real handlers, and
every read that shows a payment: the job, the order, the user's coupons, the histories."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable

import pytest
from flask.testing import FlaskClient
from sqlalchemy.orm import Session
from werkzeug.test import TestResponse

import workers.points  # noqa: F401  (registers the user partition's handler)
from shared.config import Settings
from shared.jobs import JobKind, partition_for_job
from shared.models import Job
from tests.api.conftest import RFC3339_MS_Z, assert_error, row_counts
from tests.conftest import RecordingPublisher
from tests.factories import (
    CouponFactory,
    OrderFactory,
    PointBalanceFactory,
    ProductFactory,
    UserCouponFactory,
)
from workers.base import Runtime, drain_partition


@pytest.fixture
def drain(runtime: Runtime) -> Callable[[str], int]:
    return lambda queue: drain_partition(runtime, queue)


def _accepted(answer: TestResponse) -> str:
    assert answer.status_code == 202, answer.get_data(as_text=True)
    job_id: str = answer.get_json()["jobId"]
    return job_id


def _user() -> int:
    return uuid.uuid4().int % 10**15 + 1


def test_a_payment_with_a_coupon_shows_in_every_read(
    client: FlaskClient,
    db_session: Session,
    publisher: RecordingPublisher,
    settings: Settings,
    drain: Callable[[str], int],
) -> None:
    user = _user()
    PointBalanceFactory(user_id=user, balance=1_000)
    product = ProductFactory(price=400)
    order = OrderFactory(
        user_id=user,
        lines=[(product, 2)],
        expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=15),
    )
    coupon = CouponFactory(discount_amount=300)
    held = UserCouponFactory(coupon_id=coupon.id, user_id=user)
    before = client.get(f"/v1/orders/{order.id}").get_json()
    assert before["payment"] is None
    assert RFC3339_MS_Z.match(before["expiresAt"])

    job_id = _accepted(
        client.post(f"/v1/orders/{order.id}/payment", json={"userId": user, "couponId": coupon.id})
    )
    queue = partition_for_job(JobKind.ORDER_PAY, {"userId": user}, settings.partitions)
    assert publisher.woken == [queue]
    assert queue.startswith("user.")
    assert drain(queue) == 1

    job = client.get(f"/v1/jobs/{job_id}").get_json()
    assert (job["kind"], job["status"], job["error"]) == ("ORDER_PAY", "SUCCEEDED", None)
    assert job["result"] == {
        "orderId": order.id,
        "status": "COMPLETED",
        "paidAmount": 500,
        "discountAmount": 300,
        "balance": 500,
    }
    answer = client.get(f"/v1/orders/{order.id}")
    body = answer.get_json()
    assert answer.headers["ETag"] == '"2"'
    assert (body["status"], body["version"], body["expiresAt"]) == ("COMPLETED", 2, None)
    assert set(body["payment"]) == {"paidAmount", "discountAmount", "couponId", "paidAt"}
    assert (body["payment"]["paidAmount"], body["payment"]["discountAmount"]) == (500, 300)
    assert body["payment"]["couponId"] == coupon.id
    assert RFC3339_MS_Z.match(body["payment"]["paidAt"])
    coupons = client.get(f"/v1/users/{user}/coupons").get_json()["items"]
    assert [(c["userCouponId"], c["orderId"]) for c in coupons] == [(held.id, order.id)]
    assert coupons[0]["usedAt"] == body["payment"]["paidAt"]
    history = client.get(f"/v1/points/{user}/histories").get_json()["items"]
    assert [(h["type"], h["amount"], h["balanceAfter"], h["orderId"]) for h in history] == [
        ("PAYMENT", 500, 500, order.id)
    ]
    assert client.get(f"/v1/points/{user}").get_json()["amount"] == 500


def test_a_payment_of_an_unknown_order_is_accepted_then_fails(
    client: FlaskClient, db_session: Session, drain: Callable[[str], int]
) -> None:
    job_id = _accepted(client.post("/v1/orders/987654321987/payment", json={"userId": 5}))
    job = db_session.get_one(Job, uuid.UUID(job_id))
    assert job.payload == {"orderId": 987654321987, "userId": 5}
    drain(job.partition)
    failed = client.get(f"/v1/jobs/{job_id}").get_json()
    assert (failed["status"], failed["error"]["code"]) == ("FAILED", "ORDER_NOT_FOUND")


def test_a_null_coupon_is_refused_rather_than_read_as_none(
    client: FlaskClient, db_session: Session
) -> None:
    before = row_counts(db_session)
    assert_error(
        client.post("/v1/orders/7/payment", json={"userId": 1, "couponId": None}),
        400,
        "VALIDATION_ERROR",
        fields={"couponId"},
    )
    assert row_counts(db_session) == before


def test_the_idempotency_fingerprint_tells_a_coupon_from_none(client: FlaskClient) -> None:
    headers = {"Idempotency-Key": "pay-once"}
    first = _accepted(client.post("/v1/orders/7/payment", json={"userId": 1}, headers=headers))
    again = _accepted(client.post("/v1/orders/7/payment", json={"userId": 1}, headers=headers))
    assert again == first
    assert_error(
        client.post("/v1/orders/7/payment", json={"userId": 1, "couponId": 3}, headers=headers),
        422,
        "IDEMPOTENCY_KEY_REUSED",
    )
    # Scoped to the path: the same key on another order is another job.
    other = _accepted(client.post("/v1/orders/8/payment", json={"userId": 1}, headers=headers))
    assert other != first


@pytest.mark.parametrize("order_id", ["0", "-3", str(2**63), "00012"])
def test_an_order_id_that_cannot_exist_is_404_after_validation(
    client: FlaskClient, order_id: str
) -> None:
    assert_error(
        client.post(f"/v1/orders/{order_id}/payment", json={"userId": "x"}),
        400,
        "VALIDATION_ERROR",
    )
    assert_error(
        client.post(f"/v1/orders/{order_id}/payment", json={"userId": 1}), 404, "NOT_FOUND"
    )
