"""Read endpoints: exact shapes, camelCase keys, RFC 3339 ms Z timestamps, 404s."""

from __future__ import annotations

import datetime as dt

import pytest
from flask.testing import FlaskClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from shared.domain.orders import OrderStatus
from shared.models import Product
from tests.api.conftest import RFC3339_MS_Z, assert_error
from tests.conftest import RecordingPublisher
from tests.factories import (
    CouponFactory,
    OrderFactory,
    OrderHistoryFactory,
    PointBalanceFactory,
    PointHistoryFactory,
    ProductFactory,
    UserCouponFactory,
)

MAX_ID = 2**63 - 1
PRODUCT_KEYS = {"id", "name", "price", "stock", "createdAt", "updatedAt"}


def test_product_by_id(client: FlaskClient) -> None:
    product = ProductFactory(name="Mug", price=1_250, stock=7)
    answer = client.get(f"/v1/products/{product.id}")
    assert answer.status_code == 200
    body = answer.get_json()
    assert set(body) == PRODUCT_KEYS
    assert (body["id"], body["name"], body["price"], body["stock"]) == (product.id, "Mug", 1_250, 7)
    assert RFC3339_MS_Z.match(body["createdAt"])
    assert RFC3339_MS_Z.match(body["updatedAt"])
    stored = product.created_at.astimezone(dt.UTC)
    assert body["createdAt"] == stored.strftime("%Y-%m-%dT%H:%M:%S.") + (
        f"{stored.microsecond // 1000:03d}Z"
    )


def test_product_read_goes_through_the_cache(client: FlaskClient, db_session: Session) -> None:
    product = ProductFactory(stock=7)
    assert client.get(f"/v1/products/{product.id}").get_json()["stock"] == 7
    # Behind the app's back (no cache refresh): the second read is served from the cache.
    db_session.execute(update(Product).where(Product.id == product.id).values(stock=1))
    assert client.get(f"/v1/products/{product.id}").get_json()["stock"] == 7


def test_points_balance_and_zero_for_a_user_never_charged(client: FlaskClient) -> None:
    balance = PointBalanceFactory(balance=1_234)
    assert client.get(f"/v1/points/{balance.user_id}").get_json() == {
        "userId": balance.user_id,
        "amount": 1_234,
    }
    assert client.get("/v1/points/777000111").get_json() == {"userId": 777000111, "amount": 0}


def test_point_histories_newest_first_and_paged(client: FlaskClient) -> None:
    user = 555_000_001
    for n in range(1, 6):
        PointHistoryFactory(user_id=user, type="CHARGE", amount=n, balance_after=n * 10)
    PointHistoryFactory(user_id=user, type="USE", amount=3, balance_after=147)
    order = OrderFactory(user_id=user)
    PointHistoryFactory(
        user_id=user, type="PAYMENT", amount=40, balance_after=107, order_id=order.id
    )
    PointHistoryFactory(user_id=user + 1)  # another user's

    first = client.get(f"/v1/points/{user}/histories?size=4").get_json()
    assert set(first) == {"items", "page", "size", "total"}
    assert (first["page"], first["size"], first["total"]) == (1, 4, 7)
    assert all(
        set(i) == {"type", "amount", "balanceAfter", "orderId", "createdAt"} for i in first["items"]
    )
    assert all(RFC3339_MS_Z.match(i["createdAt"]) for i in first["items"])
    assert [(i["type"], i["amount"], i["orderId"]) for i in first["items"]] == [
        ("PAYMENT", 40, order.id),
        ("USE", 3, None),
        ("CHARGE", 5, None),
        ("CHARGE", 4, None),
    ]
    second = client.get(f"/v1/points/{user}/histories?page=2&size=4").get_json()
    assert [i["amount"] for i in second["items"]] == [3, 2, 1]
    assert second["items"][1]["balanceAfter"] == 20
    empty = client.get(f"/v1/points/{user}/histories?page=3&size=4").get_json()
    assert empty == {"items": [], "page": 3, "size": 4, "total": 7}
    default = client.get("/v1/points/1/histories").get_json()
    assert (default["page"], default["size"]) == (1, 20)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("page=0", "page"),
        ("page=-1", "page"),
        ("page=x", "page"),
        ("page=1.5", "page"),
        ("page=9223372036854775807", "page"),
        ("size=0", "size"),
        ("size=101", "size"),
        ("size=", "size"),
    ],
)
def test_bad_paging_is_a_validation_error(client: FlaskClient, query: str, field: str) -> None:
    assert_error(
        client.get(f"/v1/points/1/histories?{query}"), 400, "VALIDATION_ERROR", fields={field}
    )
    assert_error(client.get(f"/v1/products?{query}"), 400, "VALIDATION_ERROR", fields={field})


def test_last_page_whose_offset_fits_a_bigint_is_empty_not_an_error(client: FlaskClient) -> None:
    page = MAX_ID // 100 + 1
    answer = client.get(f"/v1/products?page={page}&size=100")
    assert answer.status_code == 200
    assert answer.get_json()["items"] == []


def test_order_by_id_with_etag(client: FlaskClient) -> None:
    cheap, dear = ProductFactory(price=300), ProductFactory(price=1_000)
    order = OrderFactory(user_id=42, lines=[(dear, 1), (cheap, 2)])
    answer = client.get(f"/v1/orders/{order.id}")
    assert answer.status_code == 200
    assert answer.headers["ETag"] == '"1"'
    body = answer.get_json()
    assert list(body) == [
        "id",
        "userId",
        "status",
        "version",
        "totalPrice",
        "orderLines",
        "payment",
        "expiresAt",
        "createdAt",
        "updatedAt",
    ]
    assert body["id"] == order.id
    assert body["userId"] == 42
    assert body["status"] == "READY"
    assert body["version"] == 1
    assert body["totalPrice"] == 1_600
    assert body["payment"] is None
    assert body["expiresAt"] is None  # the factory sets none; see the paid order below
    assert sorted(body["orderLines"], key=lambda line: line["productId"]) == [
        {"productId": cheap.id, "quantity": 2, "unitPrice": 300},
        {"productId": dear.id, "quantity": 1, "unitPrice": 1_000},
    ]
    assert RFC3339_MS_Z.match(body["createdAt"])
    assert RFC3339_MS_Z.match(body["updatedAt"])


def test_a_paid_order_shows_its_payment_and_no_expiry(client: FlaskClient) -> None:
    coupon = CouponFactory()
    paid_at = dt.datetime(2026, 3, 4, 5, 6, 7, 891_000, tzinfo=dt.UTC)
    order = OrderFactory(
        status=OrderStatus.COMPLETED.value,
        version=2,
        total_price=1_000,
        paid_amount=700,
        discount_amount=300,
        coupon_id=coupon.id,
        paid_at=paid_at,
    )
    body = client.get(f"/v1/orders/{order.id}").get_json()
    assert body["payment"] == {
        "paidAmount": 700,
        "discountAmount": 300,
        "couponId": coupon.id,
        "paidAt": "2026-03-04T05:06:07.891Z",
    }
    assert body["expiresAt"] is None
    unpaid = OrderFactory(expires_at=paid_at + dt.timedelta(minutes=15))
    body = client.get(f"/v1/orders/{unpaid.id}").get_json()
    assert (body["payment"], body["expiresAt"]) == (None, "2026-03-04T05:21:07.891Z")


def test_order_histories_in_the_order_entered(client: FlaskClient) -> None:
    start = dt.datetime(2026, 1, 2, 3, 4, 5, 678_000, tzinfo=dt.UTC)
    # An order's states are entered from its creation on (the read skips earlier months).
    order = OrderFactory(status=OrderStatus.COMPLETED.value, version=3, created_at=start)
    for n, status in enumerate(
        [OrderStatus.READY, OrderStatus.PAYMENT_READY, OrderStatus.COMPLETED]
    ):
        OrderHistoryFactory(
            order_id=order.id, status=status.value, created_at=start + dt.timedelta(seconds=n)
        )
    body = client.get(f"/v1/orders/{order.id}/histories").get_json()
    assert body == {
        "items": [
            {"status": "READY", "createdAt": "2026-01-02T03:04:05.678Z"},
            {"status": "PAYMENT_READY", "createdAt": "2026-01-02T03:04:06.678Z"},
            {"status": "COMPLETED", "createdAt": "2026-01-02T03:04:07.678Z"},
        ]
    }
    fresh = OrderFactory()
    assert client.get(f"/v1/orders/{fresh.id}/histories").get_json() == {"items": []}


def test_coupon_by_id(client: FlaskClient) -> None:
    coupon = CouponFactory(name="Spring", discount_amount=700, total_quantity=5, issued_quantity=2)
    assert client.get(f"/v1/coupons/{coupon.id}").get_json() == {
        "id": coupon.id,
        "name": "Spring",
        "discountAmount": 700,
        "totalQuantity": 5,
        "issuedQuantity": 2,
        "remaining": 3,
    }


def test_user_coupons_in_the_order_issued(client: FlaskClient) -> None:
    user = 321_000_001
    first, second = CouponFactory(name="B", discount_amount=10), CouponFactory(name="A")
    one = UserCouponFactory(coupon_id=first.id, user_id=user)
    order = OrderFactory(user_id=user)
    used_at = dt.datetime(2026, 5, 6, 7, 8, 9, 123_000, tzinfo=dt.UTC)
    two = UserCouponFactory(coupon_id=second.id, user_id=user, used_at=used_at, order_id=order.id)
    UserCouponFactory(coupon_id=first.id, user_id=user + 1)
    body = client.get(f"/v1/users/{user}/coupons").get_json()
    assert set(body) == {"items"}
    assert [{k: v for k, v in item.items() if k != "issuedAt"} for item in body["items"]] == [
        {
            "userCouponId": one.id,
            "couponId": first.id,
            "name": "B",
            "discountAmount": 10,
            "usedAt": None,
            "orderId": None,
        },
        {
            "userCouponId": two.id,
            "couponId": second.id,
            "name": "A",
            "discountAmount": 500,
            "usedAt": "2026-05-06T07:08:09.123Z",
            "orderId": order.id,
        },
    ]
    assert all(RFC3339_MS_Z.match(item["issuedAt"]) for item in body["items"])
    assert client.get("/v1/users/1/coupons").get_json() == {"items": []}


@pytest.mark.parametrize(
    "path",
    [
        "/v1/products/{}",
        "/v1/orders/{}",
        "/v1/orders/{}/histories",
        "/v1/coupons/{}",
    ],
)
@pytest.mark.parametrize("resource_id", ["987654321", "0", str(2**63), str(2**64), "-1", "1e3"])
def test_unknown_or_out_of_range_ids_are_404(
    client: FlaskClient, path: str, resource_id: str
) -> None:
    assert_error(client.get(path.format(resource_id)), 404, "NOT_FOUND")


@pytest.mark.parametrize(
    "path", ["/v1/points/{}", "/v1/points/{}/histories", "/v1/users/{}/coupons"]
)
@pytest.mark.parametrize("user_id", ["0", str(2**63), "-5", "abc"])
def test_out_of_range_user_ids_are_404(client: FlaskClient, path: str, user_id: str) -> None:
    assert_error(client.get(path.format(user_id)), 404, "NOT_FOUND")


def test_largest_id_is_in_range(client: FlaskClient) -> None:
    assert client.get(f"/v1/points/{MAX_ID}").get_json() == {"userId": MAX_ID, "amount": 0}
    assert_error(client.get(f"/v1/products/{MAX_ID}"), 404, "NOT_FOUND")


def test_unknown_query_parameters_are_ignored(client: FlaskClient) -> None:
    product = ProductFactory()
    assert client.get(f"/v1/products/{product.id}?foo=bar&page=zzz").status_code == 200


def test_health_and_readiness(client: FlaskClient, publisher: RecordingPublisher) -> None:
    assert client.get("/healthz").get_json() == {"status": "ok"}
    assert client.get("/readyz").get_json() == {
        "status": "ok",
        "checks": {"database": "ok", "cache": "ok", "broker": "ok"},
    }
    publisher.fail = True
    answer = client.get("/readyz")
    assert answer.status_code == 503
    assert answer.get_json() == {
        "status": "unavailable",
        "checks": {"database": "ok", "cache": "ok", "broker": "down"},
    }


def test_metrics_docs_and_openapi(client: FlaskClient) -> None:
    client.get("/healthz")
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.mimetype == "text/plain"
    assert "http_requests_total" in metrics.get_data(as_text=True)
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "/openapi.json" in docs.get_data(as_text=True)
    spec = client.get("/openapi.json")
    assert spec.status_code == 200
    assert spec.get_json()["openapi"].startswith("3.")
