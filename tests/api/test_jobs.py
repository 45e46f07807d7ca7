"""Job POSTs (202, Location, routing), Idempotency-Key, and GET /v1/jobs/{id}."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from werkzeug.test import TestResponse

import workers.coupons
import workers.orders
import workers.points
import workers.products  # noqa: F401  (registers the handlers drain_partition applies)
from shared.config import Settings
from shared.jobs import JobKind, partition_for_job
from shared.models import Job, Product
from shared.partitions import PartitionKind, partition
from tests.api.conftest import RFC3339_MS_Z, UUID, assert_error, row_counts
from tests.conftest import ADMIN, RecordingPublisher
from tests.factories import CouponFactory, PointBalanceFactory, ProductFactory
from workers.base import Runtime, drain_partition

JOB_VIEW_KEYS = {
    "jobId",
    "kind",
    "status",
    "result",
    "error",
    "createdAt",
    "finishedAt",
    "position",
}


@dataclass(frozen=True)
class JobCall:
    """A job endpoint: how to call it and the payload its job row must hold."""

    kind: JobKind
    send: Callable[[FlaskClient, dict[str, str]], TestResponse]
    payload: dict[str, Any]


def _calls() -> list[JobCall]:
    product, coupon = 424_242, 535_353
    return [
        JobCall(
            JobKind.POINTS_CHARGE,
            lambda c, h: c.post("/v1/points/charge", json={"userId": 7, "amount": 50}, headers=h),
            {"userId": 7, "amount": 50},
        ),
        JobCall(
            JobKind.POINTS_USE,
            lambda c, h: c.post("/v1/points/use", json={"userId": 8, "amount": 5}, headers=h),
            {"userId": 8, "amount": 5},
        ),
        JobCall(
            JobKind.STOCK_SET,
            lambda c, h: c.put(
                f"/v1/products/{product}/stock", json={"stock": 3}, headers={**ADMIN, **h}
            ),
            {"productId": product, "stock": 3},
        ),
        JobCall(
            JobKind.ORDER_CREATE,
            lambda c, h: c.post(
                "/v1/orders",
                json={
                    "userId": 9,
                    "orderLines": [
                        {"productId": 900, "quantity": 1},
                        {"productId": 31, "quantity": 2},
                    ],
                },
                headers=h,
            ),
            {
                "userId": 9,
                "orderLines": [{"productId": 900, "quantity": 1}, {"productId": 31, "quantity": 2}],
            },
        ),
        JobCall(
            JobKind.COUPON_ISSUE,
            lambda c, h: c.post(f"/v1/coupons/{coupon}/issue", json={"userId": 10}, headers=h),
            {"couponId": coupon, "userId": 10},
        ),
    ]


CALLS = _calls()


def assert_accepted(answer: TestResponse) -> str:
    assert answer.status_code == 202, answer.get_data(as_text=True)
    body = answer.get_json()
    assert set(body) == {"jobId", "status", "statusUrl"}
    assert UUID.match(body["jobId"])
    assert body["statusUrl"] == f"/v1/jobs/{body['jobId']}"
    assert answer.headers["Location"] == body["statusUrl"]
    job_id: str = body["jobId"]
    return job_id


def _job(session: Session, job_id: str) -> Job:
    job = session.get(Job, uuid.UUID(job_id), populate_existing=True)
    assert job is not None
    return job


@pytest.fixture
def drain(runtime: Runtime) -> Callable[[str], int]:
    """Apply every pending job of a partition with the real handlers, on the test session."""
    return lambda queue: drain_partition(runtime, queue)


@pytest.mark.parametrize("call", CALLS, ids=[c.kind.value for c in CALLS])
def test_job_post_records_a_pending_job_and_wakes_its_partition(
    client: FlaskClient,
    db_session: Session,
    publisher: RecordingPublisher,
    settings: Settings,
    call: JobCall,
) -> None:
    job_id = assert_accepted(call.send(client, {}))
    assert client.get(f"/v1/jobs/{job_id}").get_json()["status"] == "PENDING"
    queue = partition_for_job(call.kind, call.payload, settings.partitions)
    job = _job(db_session, job_id)
    assert (job.kind, job.status, job.partition, job.payload) == (
        call.kind.value,
        "PENDING",
        queue,
        call.payload,
    )
    assert publisher.woken == [queue]


def test_routing_keys_follow_the_architecture(settings: Settings) -> None:
    n = settings.partitions
    order = {
        "userId": 1,
        "orderLines": [{"productId": 900, "quantity": 1}, {"productId": 31, "quantity": 1}],
    }
    assert partition_for_job(JobKind.ORDER_CREATE, order, n) == partition_for_job(
        JobKind.STOCK_SET, {"productId": 31, "stock": 0}, n
    )
    assert partition_for_job(JobKind.POINTS_USE, {"userId": 8, "amount": 1}, n).startswith("user.")
    assert partition_for_job(JobKind.COUPON_ISSUE, {"couponId": 5, "userId": 1}, n).startswith(
        "coupon."
    )


def test_job_endpoints_do_not_look_resources_up(
    client: FlaskClient, db_session: Session, drain: Callable[[str], int]
) -> None:
    stock = assert_accepted(client.put("/v1/products/88776655/stock?stock=1", headers=ADMIN))
    order = assert_accepted(
        client.post(
            "/v1/orders", json={"userId": 1, "orderLines": [{"productId": 88776655, "quantity": 1}]}
        )
    )
    issue = assert_accepted(client.post("/v1/coupons/88776655/issue?userId=1"))
    for job_id in (stock, order, issue):
        drain(_job(db_session, job_id).partition)
    codes = [client.get(f"/v1/jobs/{j}").get_json()["error"]["code"] for j in (stock, order, issue)]
    assert codes == ["PRODUCT_NOT_FOUND", "PRODUCT_NOT_FOUND", "COUPON_NOT_FOUND"]


# ---- job status ------------------------------------------------------------


def test_pending_job_view(client: FlaskClient) -> None:
    job_id = assert_accepted(client.post("/v1/points/charge", json={"userId": 3, "amount": 9}))
    body = client.get(f"/v1/jobs/{job_id}").get_json()
    assert set(body) == JOB_VIEW_KEYS
    assert body["jobId"] == job_id
    assert body["kind"] == "POINTS_CHARGE"
    assert body["status"] == "PENDING"
    assert body["result"] is None
    assert body["error"] is None
    assert RFC3339_MS_Z.match(body["createdAt"])
    assert body["finishedAt"] is None
    assert body["position"]["partition"] == partition(PartitionKind.USER, 3, 16)
    assert isinstance(body["position"]["ahead"], int)


def test_position_counts_the_jobs_ahead_on_the_partition(client: FlaskClient) -> None:
    user = 3_000_017
    ids = [
        assert_accepted(client.post("/v1/points/charge", json={"userId": user, "amount": 1}))
        for _ in range(3)
    ]
    aheads = [client.get(f"/v1/jobs/{j}").get_json()["position"]["ahead"] for j in ids]
    assert aheads[1] == aheads[0] + 1
    assert aheads[2] == aheads[0] + 2


def test_succeeded_and_failed_job_views(
    client: FlaskClient, db_session: Session, drain: Callable[[str], int]
) -> None:
    PointBalanceFactory(user_id=4_000_001, balance=100)
    ok = assert_accepted(client.post("/v1/points/use", json={"userId": 4_000_001, "amount": 60}))
    bad = assert_accepted(client.post("/v1/points/use", json={"userId": 4_000_001, "amount": 41}))
    assert drain(_job(db_session, ok).partition) == 2

    done = client.get(f"/v1/jobs/{ok}?wait=5").get_json()
    assert set(done) == JOB_VIEW_KEYS
    assert done["status"] == "SUCCEEDED"
    assert done["result"] == {"userId": 4_000_001, "amount": 40}
    assert done["error"] is None
    assert RFC3339_MS_Z.match(done["finishedAt"])
    assert done["finishedAt"] >= done["createdAt"]
    assert done["position"] is None

    failed = client.get(f"/v1/jobs/{bad}").get_json()
    assert failed["status"] == "FAILED"
    assert failed["result"] is None
    assert set(failed["error"]) == {"code", "message"}
    assert failed["error"]["code"] == "INSUFFICIENT_POINTS"
    assert RFC3339_MS_Z.match(failed["finishedAt"])


def test_job_results_of_each_kind(
    client: FlaskClient, db_session: Session, drain: Callable[[str], int]
) -> None:
    product = ProductFactory(price=250, stock=5)
    coupon = CouponFactory(total_quantity=1)
    stock = assert_accepted(
        client.put(f"/v1/products/{product.id}/stock", json={"stock": 9}, headers=ADMIN)
    )
    order = assert_accepted(
        client.post(
            "/v1/orders",
            json={"userId": 6, "orderLines": [{"productId": product.id, "quantity": 4}]},
        )
    )
    first = assert_accepted(client.post(f"/v1/coupons/{coupon.id}/issue", json={"userId": 6}))
    again = assert_accepted(client.post(f"/v1/coupons/{coupon.id}/issue?userId=6"))
    late = assert_accepted(client.post(f"/v1/coupons/{coupon.id}/issue?userId=7"))
    for job_id in (stock, first):
        drain(_job(db_session, job_id).partition)

    def view(job_id: str) -> dict[str, Any]:
        body: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").get_json()
        return body

    stock_view = view(stock)
    assert stock_view["kind"] == "STOCK_SET"
    assert set(stock_view["result"]) == {"id", "name", "price", "stock", "createdAt", "updatedAt"}
    assert stock_view["result"]["stock"] == 9
    order_view = view(order)
    assert order_view["kind"] == "ORDER_CREATE"
    assert set(order_view["result"]) == {"orderId", "status"}
    assert order_view["result"]["status"] == "READY"
    placed = client.get(f"/v1/orders/{order_view['result']['orderId']}").get_json()
    assert placed["totalPrice"] == 1_000
    assert client.get(f"/v1/products/{product.id}").get_json()["stock"] == 5
    issued = view(first)
    assert issued["kind"] == "COUPON_ISSUE"
    assert set(issued["result"]) == {"couponId", "userId", "userCouponId"}
    assert (issued["result"]["couponId"], issued["result"]["userId"]) == (coupon.id, 6)
    assert view(again)["error"]["code"] == "COUPON_ALREADY_ISSUED"
    assert view(late)["error"]["code"] == "COUPON_SOLD_OUT"


@pytest.mark.parametrize(
    "job_id",
    [
        "00000000-0000-0000-0000-000000000000",
        str(uuid.UUID(int=2**128 - 1)),
        "not-a-uuid",
        "1",
        "0" * 40,
        "%00",
        "z" * 500,
    ],
)
def test_unknown_or_malformed_job_id_is_404(client: FlaskClient, job_id: str) -> None:
    assert_error(client.get(f"/v1/jobs/{job_id}"), 404, "NOT_FOUND")
    assert_error(client.get(f"/v1/jobs/{job_id}?wait=1"), 404, "NOT_FOUND")


@pytest.mark.parametrize("wait", ["31", "-1", "1.5", "abc", "", "true", "99999999999999999999"])
def test_wait_outside_0_to_30_is_400_before_the_id_is_looked_up(
    client: FlaskClient, wait: str
) -> None:
    job_id = assert_accepted(client.post("/v1/points/charge", json={"userId": 3, "amount": 9}))
    assert_error(
        client.get(f"/v1/jobs/{job_id}?wait={wait}"), 400, "VALIDATION_ERROR", fields={"wait"}
    )
    assert_error(
        client.get(f"/v1/jobs/{uuid.uuid4()}?wait={wait}"), 400, "VALIDATION_ERROR", fields={"wait"}
    )


def test_wait_on_a_pending_job_answers_pending_after_the_wait(client: FlaskClient) -> None:
    job_id = assert_accepted(client.post("/v1/points/charge", json={"userId": 3, "amount": 9}))
    assert client.get(f"/v1/jobs/{job_id}?wait=0").get_json()["status"] == "PENDING"
    assert client.get(f"/v1/jobs/{job_id}?wait=1").get_json()["status"] == "PENDING"


# ---- stock and userId: query or body -----------------------------------------


@pytest.mark.parametrize(
    ("query", "body", "stock"),
    [
        ("?stock=4", None, 4),
        ("", {"stock": 5}, 5),
        ("?stock=6", {"stock": 6}, 6),
        ("?stock=0", None, 0),
    ],
)
def test_stock_from_query_or_body(
    client: FlaskClient,
    db_session: Session,
    query: str,
    body: dict[str, int] | None,
    stock: int,
) -> None:
    answer = client.put(f"/v1/products/77/stock{query}", json=body, headers=ADMIN)
    job = _job(db_session, assert_accepted(answer))
    assert job.payload == {"productId": 77, "stock": stock}


@pytest.mark.parametrize(
    ("query", "body", "message"),
    [
        ("?stock=4", {"stock": 5}, "different"),
        ("", None, "required"),
        ("?stock=-1", None, None),
        ("", {"stock": "5"}, None),
        ("?stock=1000000001", None, None),
    ],
)
def test_stock_missing_conflicting_or_bad_is_400(
    client: FlaskClient,
    db_session: Session,
    query: str,
    body: dict[str, Any] | None,
    message: str | None,
) -> None:
    before = row_counts(db_session)
    answer = client.put(f"/v1/products/77/stock{query}", json=body, headers=ADMIN)
    error = assert_error(answer, 400, "VALIDATION_ERROR", fields={"stock"})
    if message:
        assert message in error["details"][0]["message"]
    assert row_counts(db_session) == before


@pytest.mark.parametrize(
    ("query", "body", "user"),
    [("?userId=4", None, 4), ("", {"userId": 5}, 5), ("?userId=6", {"userId": 6}, 6)],
)
def test_coupon_issue_user_from_query_or_body(
    client: FlaskClient, db_session: Session, query: str, body: dict[str, int] | None, user: int
) -> None:
    answer = client.post(f"/v1/coupons/12/issue{query}", json=body)
    job = _job(db_session, assert_accepted(answer))
    assert job.payload == {"couponId": 12, "userId": user}


@pytest.mark.parametrize(
    ("query", "body"),
    [("?userId=4", {"userId": 5}), ("", None), ("?userId=0", None), ("", {"userId": True})],
)
def test_coupon_issue_user_missing_conflicting_or_bad_is_400(
    client: FlaskClient, db_session: Session, query: str, body: dict[str, Any] | None
) -> None:
    before = row_counts(db_session)
    answer = client.post(f"/v1/coupons/12/issue{query}", json=body)
    assert_error(answer, 400, "VALIDATION_ERROR", fields={"userId"})
    assert row_counts(db_session) == before


# ---- Idempotency-Key -------------------------------------------------------------


def _jobs(session: Session) -> int:
    return session.execute(select(func.count()).select_from(Job)).scalar_one()


@pytest.mark.parametrize("call", CALLS, ids=[c.kind.value for c in CALLS])
def test_same_key_same_input_returns_the_same_job(
    client: FlaskClient, db_session: Session, call: JobCall
) -> None:
    key = {"Idempotency-Key": f"key-{call.kind.value}"}
    first = assert_accepted(call.send(client, key))
    count = _jobs(db_session)
    assert assert_accepted(call.send(client, key)) == first
    assert _jobs(db_session) == count
    # Another key is another job.
    assert assert_accepted(call.send(client, {"Idempotency-Key": "other"})) != first


def test_same_key_other_input_is_422_and_records_nothing(
    client: FlaskClient, db_session: Session
) -> None:
    key = {"Idempotency-Key": "charge-once"}
    assert_accepted(client.post("/v1/points/charge", json={"userId": 1, "amount": 5}, headers=key))
    before = row_counts(db_session)
    answer = client.post("/v1/points/charge", json={"userId": 1, "amount": 6}, headers=key)
    assert_error(answer, 422, "IDEMPOTENCY_KEY_REUSED")
    assert row_counts(db_session) == before


def test_key_fingerprint_is_the_validated_input(client: FlaskClient) -> None:
    key = {"Idempotency-Key": "canonical"}
    first = assert_accepted(
        client.post(
            "/v1/points/charge",
            data='{"userId": 1, "amount": 5}',
            content_type="application/json",
            headers=key,
        )
    )
    reordered = client.post(
        "/v1/points/charge",
        data='{\n  "amount":5,"userId":1}',
        content_type="application/json",
        headers=key,
    )
    assert assert_accepted(reordered) == first
    stock_key = {**ADMIN, "Idempotency-Key": "stock-7"}
    by_query = assert_accepted(client.put("/v1/products/5/stock?stock=7", headers=stock_key))
    by_body = client.put("/v1/products/5/stock", json={"stock": 7}, headers=stock_key)
    assert assert_accepted(by_body) == by_query


def test_keys_are_scoped_to_method_and_path(client: FlaskClient) -> None:
    key = {"Idempotency-Key": "shared-key"}
    charge = assert_accepted(
        client.post("/v1/points/charge", json={"userId": 1, "amount": 5}, headers=key)
    )
    use = assert_accepted(
        client.post("/v1/points/use", json={"userId": 1, "amount": 5}, headers=key)
    )
    assert charge != use
    one = assert_accepted(client.post("/v1/coupons/1/issue?userId=2", headers=key))
    two = assert_accepted(client.post("/v1/coupons/2/issue?userId=2", headers=key))
    assert one != two


def test_replayed_key_reports_the_current_status_without_waking_again(
    client: FlaskClient,
    db_session: Session,
    publisher: RecordingPublisher,
    drain: Callable[[str], int],
) -> None:
    key = {"Idempotency-Key": "finished"}
    body = {"userId": 2_000_002, "amount": 5}
    job_id = assert_accepted(client.post("/v1/points/charge", json=body, headers=key))
    drain(_job(db_session, job_id).partition)
    publisher.woken.clear()
    again = client.post("/v1/points/charge", json=body, headers=key)
    assert assert_accepted(again) == job_id
    assert again.get_json()["status"] == "SUCCEEDED"
    assert publisher.woken == []


@pytest.mark.parametrize("key", ["", "x" * 129, "tab\there", "é", "\x7f", "line\nbreak"])
def test_invalid_idempotency_key_is_400_and_records_nothing(
    client: FlaskClient, db_session: Session, key: str
) -> None:
    before = row_counts(db_session)
    environ = {"HTTP_IDEMPOTENCY_KEY": key}
    answer = client.post(
        "/v1/points/charge", json={"userId": 1, "amount": 5}, environ_overrides=environ
    )
    assert_error(answer, 400, "VALIDATION_ERROR", fields={"Idempotency-Key"})
    assert row_counts(db_session) == before


def test_longest_printable_key_is_accepted(client: FlaskClient) -> None:
    key = "".join(chr(c) for c in range(0x20, 0x7F)) + "k" * 33
    assert len(key) == 128
    answer = client.post(
        "/v1/points/charge", json={"userId": 1, "amount": 5}, headers={"Idempotency-Key": key}
    )
    assert_accepted(answer)


# ---- the broker down ---------------------------------------------------------------


def test_committed_job_answers_202_even_if_the_wake_up_fails_then_503_once_known_down(
    client: FlaskClient, db_session: Session, publisher: RecordingPublisher, settings: Settings
) -> None:
    publisher.fail = True
    accepted = [
        assert_accepted(client.post("/v1/points/charge", json={"userId": 1, "amount": 5}))
        for _ in range(settings.breaker_fail_max)
    ]
    assert all(_job(db_session, j).status == "PENDING" for j in accepted)
    before = row_counts(db_session)
    answer = client.post("/v1/points/charge", json={"userId": 1, "amount": 5})
    assert_error(answer, 503, "UNAVAILABLE")
    assert answer.headers["Retry-After"]
    assert row_counts(db_session) == before
    # Reads and products are unaffected.
    product = ProductFactory()
    assert client.get(f"/v1/products/{product.id}").status_code == 200
    assert db_session.get(Product, product.id) is not None


# ---- Prefer: wait ------------------------------------------------------------------


def test_prefer_wait_answers_202_when_the_job_does_not_finish_in_time(
    client: FlaskClient,
) -> None:
    # No worker applies jobs here: the wait runs out and the answer is the usual 202.
    answer = client.post(
        "/v1/points/charge", json={"userId": 31, "amount": 5}, headers={"Prefer": "wait=1"}
    )
    assert_accepted(answer)
    assert "Preference-Applied" not in answer.headers


@pytest.mark.parametrize(
    "preference",
    ["wait=0", "wait=-1", "wait=", "wait", "wait=1.5", "wait=abc", "wait=٣", "respond-async", ""],
)
def test_a_preference_not_understood_is_ignored(client: FlaskClient, preference: str) -> None:
    answer = client.post(
        "/v1/points/charge", json={"userId": 32, "amount": 5}, headers={"Prefer": preference}
    )
    assert_accepted(answer)


@pytest.mark.parametrize(
    ("preference", "applied"),
    [
        ("wait=5", "wait=5"),
        ("respond-async, wait=7", "wait=7"),
        ('WAIT="4"; foo=bar', "wait=4"),
        ("wait=99", "wait=30"),  # capped at 30 (and at MAX_WAIT_SECONDS, 30 here)
    ],
)
def test_prefer_wait_answers_a_finished_job_with_its_status_document(
    client: FlaskClient,
    db_session: Session,
    drain: Callable[[str], int],
    preference: str,
    applied: str,
) -> None:
    key = {"Idempotency-Key": f"prefer-{uuid.uuid4()}"}
    body = {"userId": 4_000_033, "amount": 70}
    job_id = assert_accepted(client.post("/v1/points/charge", json=body, headers=key))
    drain(_job(db_session, job_id).partition)

    # A replay with Prefer: wait of a finished job answers its outcome at once.
    answer = client.post("/v1/points/charge", json=body, headers={**key, "Prefer": preference})
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert answer.headers["Location"] == f"/v1/jobs/{job_id}"
    assert answer.headers["Preference-Applied"] == applied
    document = answer.get_json()
    assert document == client.get(f"/v1/jobs/{job_id}").get_json()
    assert document["status"] == "SUCCEEDED"
    assert document["result"] == {"userId": 4_000_033, "amount": 70}
