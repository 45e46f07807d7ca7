"""The error shape and the order of checks: 404/405, 401/403, 413, 415, 429, 400, 404."""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.test import TestResponse

from shared.config import Settings
from tests.api.conftest import assert_error, row_counts
from tests.conftest import ADMIN, RecordingPublisher, create_test_app
from tests.factories import ProductFactory

BIG = 64 * 1024
# (method, path, a valid JSON body or None) of every endpoint that needs the admin token.
ADMIN_ENDPOINTS = [
    ("POST", "/v1/products", {"name": "n", "price": 1, "stock": 1}),
    ("PUT", "/v1/products/5/stock", {"stock": 1}),
    ("POST", "/v1/coupons", {"name": "n", "discountAmount": 1, "totalQuantity": 1}),
    ("PUT", "/v1/orders/5/status?status=FAILED", None),
]


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """An endpoint taking a JSON body, with a valid body and the headers it needs."""

    method: str
    path: str
    body: dict[str, Any]
    headers: dict[str, str]

    def send(self, client: FlaskClient, **kwargs: Any) -> TestResponse:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return client.open(self.path, method=self.method, headers=headers, **kwargs)


BODY_ENDPOINTS = [
    Endpoint("POST", "/v1/points/charge", {"userId": 1, "amount": 1}, {}),
    Endpoint("POST", "/v1/points/use", {"userId": 1, "amount": 1}, {}),
    Endpoint(
        "POST", "/v1/orders", {"userId": 1, "orderLines": [{"productId": 1, "quantity": 1}]}, {}
    ),
    Endpoint("POST", "/v1/coupons/5/issue", {"userId": 1}, {}),
    Endpoint("POST", "/v1/products", {"name": "n", "price": 1, "stock": 1}, ADMIN),
    Endpoint("PUT", "/v1/products/5/stock", {"stock": 1}, ADMIN),
    Endpoint("POST", "/v1/coupons", {"name": "n", "discountAmount": 1, "totalQuantity": 1}, ADMIN),
]
BODY_IDS = [f"{e.method} {e.path}" for e in BODY_ENDPOINTS]


def _padded(body: dict[str, Any], size: int) -> bytes:
    """``body`` as JSON of exactly ``size`` bytes (whitespace padding keeps it valid)."""
    raw = json.dumps(body).encode()
    return raw[:-1] + b" " * (size - len(raw)) + b"}"


# ---- routes and methods ------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/", "/v1", "/v1/nope", "/v2/products", "/v1/products/1/nope", "/v1/points/x"]
)
def test_unknown_route_is_json_404(client: FlaskClient, path: str) -> None:
    assert_error(client.get(path), 404, "NOT_FOUND")
    # Not even access or body checks come first.
    assert_error(
        client.post(path, data="x" * (BIG + 1), content_type="text/plain"), 404, "NOT_FOUND"
    )


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/v1/points/charge", {"POST"}),
        ("DELETE", "/v1/products", {"GET", "POST"}),
        ("POST", "/v1/products/5", {"GET"}),
        ("GET", "/v1/products/5/stock", {"PUT"}),
        ("PATCH", "/v1/orders/5/status", {"PUT"}),
        ("PUT", "/v1/jobs/00000000-0000-0000-0000-000000000000", {"GET"}),
        ("POST", "/healthz", {"GET"}),
        ("DELETE", "/v1/coupons/5", {"GET"}),
        ("OPTIONS", "/v1/products/5", {"GET"}),
        ("OPTIONS", "/v1/orders", {"POST"}),
        ("TRACE", "/v1/orders", {"POST"}),
    ],
)
def test_wrong_method_is_405_with_allow(
    client: FlaskClient, method: str, path: str, allowed: set[str]
) -> None:
    # No token and a bad body: the method is checked first.
    answer = client.open(path, method=method, data="x", content_type="text/plain")
    assert_error(answer, 405, "METHOD_NOT_ALLOWED")
    listed = {m.strip() for m in answer.headers["Allow"].split(",")}
    assert allowed <= listed
    assert listed <= allowed | {"HEAD"}  # HEAD comes with GET


# ---- access -------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ADMIN_ENDPOINTS, ids=[p for _, p, _ in ADMIN_ENDPOINTS])
@pytest.mark.parametrize(
    "auth",
    [
        (None, 401, "UNAUTHENTICATED"),
        ("", 403, "FORBIDDEN"),
        ("Bearer", 403, "FORBIDDEN"),
        ("Bearer ", 403, "FORBIDDEN"),
        ("Bearer wrong", 403, "FORBIDDEN"),
        ("Bearer test-admin-token-and-more", 403, "FORBIDDEN"),
        ("Bearer test-admin-toke", 403, "FORBIDDEN"),
        ("Basic dGVzdC1hZG1pbi10b2tlbg==", 403, "FORBIDDEN"),
        ("test-admin-token", 403, "FORBIDDEN"),
    ],
)
def test_admin_endpoints_401_without_a_token_403_with_another(
    client: FlaskClient,
    db_session: Session,
    endpoint: tuple[str, str, dict[str, Any] | None],
    auth: tuple[str | None, int, str],
) -> None:
    method, path, body = endpoint
    authorization, status, code = auth
    headers = {} if authorization is None else {"Authorization": authorization}
    before = row_counts(db_session)
    assert_error(client.open(path, method=method, json=body, headers=headers), status, code)
    assert row_counts(db_session) == before


@pytest.mark.parametrize(
    ("method", "path", "body"), ADMIN_ENDPOINTS, ids=[p for _, p, _ in ADMIN_ENDPOINTS]
)
def test_access_is_checked_before_size_type_and_validation(
    client: FlaskClient, method: str, path: str, body: dict[str, Any] | None
) -> None:
    too_big = {"data": "x" * (BIG + 1), "content_type": "text/plain"}
    for headers, status, code in [
        ({}, 401, "UNAUTHENTICATED"),
        ({"Authorization": "x"}, 403, "FORBIDDEN"),
    ]:
        assert_error(client.open(path, method=method, headers=headers, **too_big), status, code)
        assert_error(
            client.open(path, method=method, headers=headers, data="{", content_type="text/plain"),
            status,
            code,
        )
        assert_error(
            client.open(path, method=method, headers=headers, json={"bad": True}), status, code
        )


def test_admin_calls_with_the_token_pass(client: FlaskClient) -> None:
    product = ProductFactory()
    assert client.put(f"/v1/products/{product.id}/stock?stock=1", headers=ADMIN).status_code == 202


# ---- size and content type ------------------------------------------------------------


@pytest.mark.parametrize("endpoint", BODY_ENDPOINTS, ids=BODY_IDS)
def test_body_of_64_kib_passes_one_byte_more_is_413(
    client: FlaskClient, db_session: Session, endpoint: Endpoint
) -> None:
    fits = endpoint.send(client, data=_padded(endpoint.body, BIG), content_type="application/json")
    assert fits.status_code in (201, 202), fits.get_data(as_text=True)
    before = row_counts(db_session)
    over = endpoint.send(
        client, data=_padded(endpoint.body, BIG + 1), content_type="application/json"
    )
    assert_error(over, 413, "PAYLOAD_TOO_LARGE")
    # Too large and the wrong type: size is checked first.
    both = endpoint.send(client, data=b"x" * (BIG + 1), content_type="text/plain")
    assert_error(both, 413, "PAYLOAD_TOO_LARGE")
    assert row_counts(db_session) == before


def test_a_declared_length_over_the_limit_is_413_without_reading(client: FlaskClient) -> None:
    answer = client.post(
        "/v1/points/charge",
        data=b'{"userId":1,"amount":1}',
        content_type="application/json",
        environ_overrides={"CONTENT_LENGTH": str(BIG + 1)},
    )
    assert_error(answer, 413, "PAYLOAD_TOO_LARGE")


@pytest.mark.parametrize("endpoint", BODY_ENDPOINTS, ids=BODY_IDS)
@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonp",
        "application/xml",
        "json",
    ],
)
def test_a_body_without_a_json_content_type_is_415(
    client: FlaskClient, db_session: Session, endpoint: Endpoint, content_type: str | None
) -> None:
    before = row_counts(db_session)
    environ = {} if content_type is None else {"CONTENT_TYPE": content_type}
    valid = endpoint.send(client, data=json.dumps(endpoint.body), environ_overrides=environ)
    assert_error(valid, 415, "UNSUPPORTED_MEDIA_TYPE")
    # Wrong type and an invalid body: the type is checked first.
    invalid = endpoint.send(client, data="{nope", environ_overrides=environ)
    assert_error(invalid, 415, "UNSUPPORTED_MEDIA_TYPE")
    assert row_counts(db_session) == before


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/merge-patch+json",
    ],
)
def test_json_content_types_are_accepted(client: FlaskClient, content_type: str) -> None:
    answer = client.post(
        "/v1/points/charge", data='{"userId": 1, "amount": 1}', content_type=content_type
    )
    assert answer.status_code == 202


def test_optional_bodies_may_be_absent_without_a_content_type(client: FlaskClient) -> None:
    assert client.put("/v1/products/5/stock?stock=1", headers=ADMIN).status_code == 202
    assert client.post("/v1/coupons/5/issue?userId=1").status_code == 202


# ---- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "fields"),
    [
        ("/v1/points/charge", {}, {"userId", "amount"}),
        ("/v1/points/charge", {"userId": "1", "amount": 1.0}, {"userId", "amount"}),
        ("/v1/points/charge", {"userId": 1, "amount": 1, "extra": 1}, {"extra"}),
        ("/v1/points/charge", {"userId": 1, "amount": 1_000_001}, {"amount"}),
        ("/v1/points/use", {"userId": 0, "amount": 0}, {"userId", "amount"}),
        ("/v1/points/use", {"user_id": 1, "amount": 1}, {"userId", "user_id"}),
        ("/v1/orders", {"userId": 1}, {"orderLines"}),
        ("/v1/orders", {"userId": 1, "orderLines": []}, {"orderLines"}),
        (
            "/v1/orders",
            {
                "userId": True,
                "orderLines": [
                    {"productId": 1, "quantity": 1},
                    {"productId": 0, "quantity": 1_001},
                    {"productId": 3, "quantity": 1, "price": 5},
                    {"quantity": "2"},
                ],
            },
            {
                "userId",
                "orderLines[1].productId",
                "orderLines[1].quantity",
                "orderLines[2].price",
                "orderLines[3].productId",
                "orderLines[3].quantity",
            },
        ),
        (
            "/v1/orders",
            {"userId": 1, "orderLines": [{"productId": n, "quantity": 1} for n in range(1, 52)]},
            {"orderLines"},
        ),
        (
            "/v1/orders",
            {"userId": 1, "orderLines": [{"productId": 2, "quantity": 1}] * 2},
            {"orderLines"},
        ),
        ("/v1/orders", {"userId": 1, "orderLines": {"productId": 1}}, {"orderLines"}),
        ("/v1/coupons/5/issue", {"userId": -3}, {"userId"}),
    ],
)
def test_validation_details_name_each_bad_field(
    client: FlaskClient,
    db_session: Session,
    path: str,
    body: dict[str, Any],
    fields: set[str],
) -> None:
    before = row_counts(db_session)
    assert_error(client.post(path, json=body), 400, "VALIDATION_ERROR", fields=fields)
    assert row_counts(db_session) == before


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"name": "", "price": -1, "stock": 1.5}, {"name", "price", "stock"}),
        ({"name": None, "price": "1", "stock": True}, {"name", "price", "stock"}),
        ({"name": "ok", "price": 1}, {"stock"}),
        ({"name": "ok", "price": 1, "stock": 1, "id": 9}, {"id"}),
    ],
)
def test_product_create_validation(
    client: FlaskClient, body: dict[str, Any], fields: set[str]
) -> None:
    assert_error(
        client.post("/v1/products", json=body, headers=ADMIN),
        400,
        "VALIDATION_ERROR",
        fields=fields,
    )


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        (
            {"name": "c", "discountAmount": 0, "totalQuantity": 0},
            {"discountAmount", "totalQuantity"},
        ),
        (
            {"name": "c", "discountAmount": 1_000_000_001, "totalQuantity": 10_000_001},
            {"discountAmount", "totalQuantity"},
        ),
        ({"name": "x" * 201, "discountAmount": 1, "totalQuantity": 1}, {"name"}),
        ({"discountAmount": 1, "totalQuantity": 1}, {"name"}),
    ],
)
def test_coupon_create_validation(
    client: FlaskClient, db_session: Session, body: dict[str, Any], fields: set[str]
) -> None:
    before = row_counts(db_session)
    assert_error(
        client.post("/v1/coupons", json=body, headers=ADMIN), 400, "VALIDATION_ERROR", fields=fields
    )
    assert row_counts(db_session) == before


def test_create_coupon_answers_201(client: FlaskClient) -> None:
    answer = client.post(
        "/v1/coupons",
        json={"name": "Welcome", "discountAmount": 1_000_000_000, "totalQuantity": 10_000_000},
        headers=ADMIN,
    )
    assert answer.status_code == 201
    body = answer.get_json()
    assert body == {
        "id": body["id"],
        "name": "Welcome",
        "discountAmount": 1_000_000_000,
        "totalQuantity": 10_000_000,
        "issuedQuantity": 0,
        "remaining": 10_000_000,
    }
    assert answer.headers["Location"] == f"/v1/coupons/{body['id']}"
    assert client.get(answer.headers["Location"]).get_json() == body


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"nul",
        b"[]",
        b'"text"',
        b"42",
        b"null",
        b'{"userId": 1, "amount": 1,}',
        b"{'userId': 1, 'amount': 1}",
        b'{"userId": 1, "amount": 1}{}',
        b'{"userId": 1, "userId": 2, "amount": 1}',
        b'{"userId": 1, "amount": NaN}',
        b'{"userId": 1, "amount": Infinity}',
        b'{"userId": 1, "amount": -Infinity}',
        b'{"userId": 1, "amount": 1e400}',
        b'{"userId": 18446744073709551616, "amount": 1}',
        b"\xff\xfe{}",
        b'{"userId": 1, "amount": "\xff"}',
        b"[" * 5000 + b"]" * 5000,
    ],
)
def test_malformed_json_is_400(client: FlaskClient, db_session: Session, raw: bytes) -> None:
    before = row_counts(db_session)
    answer = client.post("/v1/points/charge", data=raw, content_type="application/json")
    assert_error(answer, 400, "VALIDATION_ERROR")
    assert row_counts(db_session) == before


@pytest.mark.parametrize("bad_id", ["0", str(2**63), str(2**64)])
def test_an_out_of_range_path_id_is_404_after_access_and_validation(
    client: FlaskClient, db_session: Session, bad_id: str
) -> None:
    before = row_counts(db_session)
    stock = f"/v1/products/{bad_id}/stock"
    assert_error(client.put(stock, json={"stock": 1}), 401, "UNAUTHENTICATED")
    assert_error(client.put(stock, json={"stock": -1}, headers=ADMIN), 400, "VALIDATION_ERROR")
    assert_error(client.put(stock, json={"stock": 1}, headers=ADMIN), 404, "NOT_FOUND")
    issue = f"/v1/coupons/{bad_id}/issue"
    assert_error(client.post(issue, json={"userId": "1"}), 400, "VALIDATION_ERROR")
    assert_error(client.post(issue, json={"userId": 1}), 404, "NOT_FOUND")
    status = f"/v1/orders/{bad_id}/status"
    assert_error(client.put(f"{status}?status=NOPE"), 401, "UNAUTHENTICATED")
    assert_error(client.put(f"{status}?status=NOPE", headers=ADMIN), 400, "VALIDATION_ERROR")
    assert_error(client.put(f"{status}?status=FAILED", headers=ADMIN), 404, "NOT_FOUND")
    assert_error(client.get(f"/v1/points/{bad_id}/histories?size=0"), 400, "VALIDATION_ERROR")
    assert_error(client.get(f"/v1/points/{bad_id}/histories"), 404, "NOT_FOUND")
    assert row_counts(db_session) == before


def test_existence_of_a_path_id_is_checked_last(client: FlaskClient) -> None:
    assert_error(
        client.put("/v1/orders/987654321/status?status=NOPE", headers=ADMIN),
        400,
        "VALIDATION_ERROR",
    )
    assert_error(client.get(f"/v1/jobs/{uuid.uuid4()}?wait=99"), 400, "VALIDATION_ERROR")


# ---- 500 and 429 ---------------------------------------------------------------------------------


def test_an_unexpected_error_is_json_500(app: Flask) -> None:
    def broken() -> str:
        raise RuntimeError("a bug")

    app.add_url_rule("/broken", view_func=broken)
    assert_error(app.test_client().get("/broken"), 500, "INTERNAL")


@pytest.fixture
def limited_app(
    settings: Settings, session_factory: sessionmaker[Session], publisher: RecordingPublisher
) -> Flask:
    return create_test_app(
        dataclasses.replace(settings, rate_limit="2/day"), session_factory, publisher
    )


def test_customer_job_posts_are_rate_limited_after_415_and_before_400(
    limited_app: Flask, db_session: Session
) -> None:
    # Its own client addresses, so no other test shares the allowance (Redis is
    # flushed at the start of the run).
    client = limited_app.test_client()
    client.environ_base["REMOTE_ADDR"] = "10.0.0.7"
    body = {"userId": 1, "amount": 1}
    assert client.post("/v1/points/charge", json=body).status_code == 202
    assert client.post("/v1/points/use", json=body).status_code == 202
    before = row_counts(db_session)
    limited = client.post("/v1/points/charge", json=body)
    assert_error(limited, 429, "RATE_LIMITED")
    assert int(limited.headers["Retry-After"]) >= 1
    assert_error(client.post("/v1/orders", json={"bad": 1}), 429, "RATE_LIMITED")
    assert_error(
        client.post("/v1/orders", data="{", content_type="text/plain"),
        415,
        "UNSUPPORTED_MEDIA_TYPE",
    )
    assert row_counts(db_session) == before
    # Reads, job polls and admin calls are not limited.
    product = ProductFactory()
    assert client.get(f"/v1/products/{product.id}").status_code == 200
    assert client.get(f"/v1/jobs/{uuid.uuid4()}").status_code == 404
    assert client.put(f"/v1/products/{product.id}/stock?stock=1", headers=ADMIN).status_code == 202
    # Another client still has its allowance.
    other = limited_app.test_client()
    other.environ_base["REMOTE_ADDR"] = "10.0.0.8"
    assert other.post("/v1/coupons/5/issue?userId=1").status_code == 202
