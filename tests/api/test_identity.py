"""AUTH_MODE=jwt (API.md, Access, "Customer identity"): who may act as, or read, a user.

The app is the real one on the test database and Redis, built with jwt settings; the
tests sign tokens as an identity provider would.  Every refusal is checked to leave
nothing behind (no job row, no wake-up), and every 403/404 beside the same request
made by the right user, which succeeds (so the refusal is the token's doing).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jsonschema_rs
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flask import Flask
from flask.testing import FlaskClient
from schemathesis.specs.openapi.definitions import OPENAPI_31
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.test import TestResponse

import workers.points  # noqa: F401  (registers the user partition's handler)
from shared.config import Settings
from shared.embedded import free_port
from shared.jobs import JobKind, partition_for_job
from shared.models import Job, Order
from tests.api.conftest import assert_error, row_counts
from tests.conftest import ADMIN, RecordingPublisher, create_test_app
from tests.factories import (
    CouponFactory,
    OrderFactory,
    PointBalanceFactory,
    PointHistoryFactory,
    ProductFactory,
    UserCouponFactory,
)
from tests.tokens import SECRET, bearer, claims, hs256
from web.api import OPERATIONS, openapi_path
from workers.base import Runtime, drain_partition

ISSUER = "https://idp.example.test/"
AUDIENCE = "shop-api"
USER_A = 4_100_000_001
USER_B = 4_100_000_002


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def make_app(
    settings: Settings, session_factory: sessionmaker[Session], publisher: RecordingPublisher
) -> Callable[..., Flask]:
    def make(**changes: Any) -> Flask:
        return create_test_app(
            dataclasses.replace(settings, auth_mode="jwt", **changes), session_factory, publisher
        )

    return make


@pytest.fixture
def hs_client(make_app: Callable[..., Flask]) -> FlaskClient:
    return make_app(auth_jwt_secret=SECRET).test_client()


@pytest.fixture
def rs_client(make_app: Callable[..., Flask], rsa_key: rsa.RSAPrivateKey) -> FlaskClient:
    return make_app(
        auth_jwt_public_key=_pem(rsa_key), auth_jwt_issuer=ISSUER, auth_jwt_audience=AUDIENCE
    ).test_client()


def _rs256(key: rsa.RSAPrivateKey, sub: int | str | None = USER_A, **extra: Any) -> str:
    body = claims(sub, **{"iss": ISSUER, "aud": AUDIENCE, **extra})
    return jwt.encode(body, key, algorithm="RS256")


def _accepted(answer: TestResponse) -> str:
    assert answer.status_code == 202, answer.get_data(as_text=True)
    job_id: str = answer.get_json()["jobId"]
    return job_id


# ---- hostile tokens -----------------------------------------------------------


def _alg_none(key: rsa.RSAPrivateKey) -> str:
    payload = _rs256(key).split(".")[1]
    return _b64(b'{"alg":"none","typ":"JWT"}') + "." + payload + "."


def _hs256_with_public_pem(key: rsa.RSAPrivateKey) -> str:
    """Algorithm confusion: an HS256 MAC keyed with the configured public key's PEM."""
    payload = _rs256(key).split(".")[1]
    signing_input = _b64(b'{"alg":"HS256","typ":"JWT"}') + "." + payload
    mac = hmac.new(_pem(key).encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


def _tampered(key: rsa.RSAPrivateKey) -> str:
    head, _, signature = _rs256(key).split(".")
    forged = claims(USER_B, iss=ISSUER, aud=AUDIENCE)
    return f"{head}.{_b64(json.dumps(forged).encode())}.{signature}"


def _signed(key: rsa.RSAPrivateKey, body: dict[str, Any]) -> str:
    return jwt.encode(body, key, algorithm="RS256")


_NOW = int(time.time())
# Each hostile case: the Authorization header it sends (None: no header at all).
HOSTILE: dict[str, Callable[[rsa.RSAPrivateKey, rsa.RSAPrivateKey], str | None]] = {
    "none": lambda k, o: None,
    "empty": lambda k, o: "Bearer ",
    "garbage": lambda k, o: "Bearer not-a-jwt",
    "two dots only": lambda k, o: "Bearer ..",
    "another scheme": lambda k, o: "Basic dXNlcjpwYXNz",
    "alg none": lambda k, o: f"Bearer {_alg_none(k)}",
    "HS256 signed with the RSA public key's PEM": lambda k, o: (
        f"Bearer {_hs256_with_public_pem(k)}"
    ),
    "tampered payload": lambda k, o: f"Bearer {_tampered(k)}",
    "wrong key": lambda k, o: f"Bearer {_rs256(o)}",
    "expired": lambda k, o: f"Bearer {_rs256(k, exp=_NOW - 3600, iat=_NOW - 7200)}",
    "nbf beyond the leeway": lambda k, o: f"Bearer {_rs256(k, nbf=int(time.time()) + 120)}",
    "iat beyond the leeway": lambda k, o: f"Bearer {_rs256(k, iat=int(time.time()) + 120)}",
    "wrong iss": lambda k, o: f"Bearer {_rs256(k, iss='https://evil.example.test/')}",
    "wrong aud": lambda k, o: f"Bearer {_rs256(k, aud='another-api')}",
    "no aud": lambda k, o: f"Bearer {_signed(k, claims(USER_A, iss=ISSUER))}",
    "no exp": lambda k, o: (
        f"Bearer {_signed(k, {'sub': str(USER_A), 'iss': ISSUER, 'aud': AUDIENCE})}"
    ),
    "sub missing": lambda k, o: f"Bearer {_rs256(k, sub=None)}",
    "sub not a number": lambda k, o: f"Bearer {_rs256(k, sub='alice')}",
    "sub 0": lambda k, o: f"Bearer {_rs256(k, sub='0')}",
    "sub with a leading zero": lambda k, o: f"Bearer {_rs256(k, sub='042')}",
    "sub out of range": lambda k, o: f"Bearer {_rs256(k, sub=str(2**63))}",
    "sub a JSON number": lambda k, o: (
        f"Bearer {_signed(k, {**claims(None, iss=ISSUER, aud=AUDIENCE), 'sub': USER_A})}"
    ),
    "over 8 KiB": lambda k, o: f"Bearer {_rs256(k, pad='x' * 8200)}",
}


@pytest.fixture
def keys(
    rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey]:
    return rsa_key, other_rsa_key


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_token_is_a_401_with_nothing_recorded(
    rs_client: FlaskClient,
    db_session: Session,
    publisher: RecordingPublisher,
    keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey],
    name: str,
) -> None:
    header = HOSTILE[name](*keys)
    headers = {} if header is None else {"Authorization": header}
    before = row_counts(db_session)
    for method, path, body in (
        ("POST", "/v1/points/charge", {"userId": USER_A, "amount": 10}),
        ("POST", "/v1/orders", {"orderLines": [{"productId": 1, "quantity": 1}]}),
        ("GET", f"/v1/points/{USER_A}", None),
        ("GET", f"/v1/jobs/{uuid.uuid4()}", None),
    ):
        answer = rs_client.open(path, method=method, json=body, headers=headers)
        assert_error(answer, 401, "UNAUTHENTICATED")
        challenge = answer.headers["WWW-Authenticate"]
        if header is None:
            assert challenge == 'Bearer realm="shop"'
        else:
            assert challenge == 'Bearer realm="shop", error="invalid_token"'
    assert row_counts(db_session) == before
    assert publisher.woken == []


def test_the_same_calls_with_a_good_token_pass(
    rs_client: FlaskClient, db_session: Session, rsa_key: rsa.RSAPrivateKey
) -> None:
    """The control of the hostile list: the one thing it changes is the token."""
    now = int(time.time())
    for token in (
        _rs256(rsa_key),
        _rs256(rsa_key, nbf=now + 20),  # within AUTH_LEEWAY_SECONDS (30)
        _rs256(rsa_key, exp=now - 20, iat=now - 600),
        _rs256(rsa_key, aud=[AUDIENCE, "another-api"]),
    ):
        job_id = _accepted(
            rs_client.post(
                "/v1/points/charge", json={"userId": USER_A, "amount": 10}, headers=bearer(token)
            )
        )
        job = db_session.get(Job, uuid.UUID(job_id))
        assert job is not None
        assert job.user_id == USER_A
        assert rs_client.get(f"/v1/points/{USER_A}", headers=bearer(token)).status_code == 200


def test_es256_key_verifies_es256_and_refuses_other_algorithms(
    make_app: Callable[..., Flask], rsa_key: rsa.RSAPrivateKey
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    client = make_app(auth_jwt_public_key=_pem(key)).test_client()
    good = jwt.encode(claims(USER_A), key, algorithm="ES256")
    assert client.get(f"/v1/points/{USER_A}", headers=bearer(good)).status_code == 200
    for token in (
        jwt.encode(claims(USER_A), rsa_key, algorithm="RS256"),
        jwt.encode(claims(USER_A), SECRET, algorithm="HS256"),
        jwt.encode(claims(USER_A), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256"),
    ):
        answer = client.get(f"/v1/points/{USER_A}", headers=bearer(token))
        assert_error(answer, 401, "UNAUTHENTICATED")


# ---- acting as oneself, reading one's own data --------------------------------


def test_user_id_may_be_left_out_and_given_must_be_the_token_user(
    hs_client: FlaskClient, db_session: Session, publisher: RecordingPublisher
) -> None:
    token = bearer(hs256(USER_A))
    job_id = _accepted(hs_client.post("/v1/points/charge", json={"amount": 7}, headers=token))
    job = db_session.get(Job, uuid.UUID(job_id))
    assert job is not None
    assert (job.user_id, job.payload) == (USER_A, {"userId": USER_A, "amount": 7})
    issue = _accepted(hs_client.post(f"/v1/coupons/{CouponFactory().id}/issue", headers=token))
    issued = db_session.get(Job, uuid.UUID(issue))
    assert issued is not None
    assert issued.user_id == USER_A
    assert issued.payload["userId"] == USER_A
    before = row_counts(db_session)
    woken = list(publisher.woken)
    answer = hs_client.post(
        "/v1/points/charge", json={"userId": USER_B, "amount": 7}, headers=token
    )
    assert_error(answer, 403, "FORBIDDEN")
    assert row_counts(db_session) == before
    assert publisher.woken == woken


def test_every_customer_endpoint_refuses_another_users_data(
    hs_client: FlaskClient, db_session: Session, runtime: Runtime
) -> None:
    """User A with A's token against B's data: the 403 / 404 of API.md, and B unchanged."""
    product = ProductFactory(stock=5)
    coupon = CouponFactory()
    PointBalanceFactory(user_id=USER_B, balance=1_000)
    PointHistoryFactory(user_id=USER_B, amount=1_000, balance_after=1_000)
    UserCouponFactory(user_id=USER_B, coupon_id=coupon.id)
    order = OrderFactory(user_id=USER_B, lines=[(product, 1)])
    db_session.flush()
    a, b = bearer(hs256(USER_A)), bearer(hs256(USER_B))
    # B's own job (if it shares A's partition, it is applied below: it fails, changing nothing).
    b_job = _accepted(hs_client.post("/v1/points/use", json={"amount": 1_000_000}, headers=b))

    before = row_counts(db_session)
    refused: list[tuple[str, str, dict[str, Any] | None, int]] = [
        ("POST", "/v1/points/charge", {"userId": USER_B, "amount": 10}, 403),
        ("POST", "/v1/points/use", {"userId": USER_B, "amount": 10}, 403),
        (
            "POST",
            "/v1/orders",
            {"userId": USER_B, "orderLines": [{"productId": product.id, "quantity": 1}]},
            403,
        ),
        ("POST", f"/v1/orders/{order.id}/payment", {"userId": USER_B}, 403),
        ("POST", f"/v1/coupons/{coupon.id}/issue?userId={USER_B}", None, 403),
        ("POST", f"/v1/coupons/{coupon.id}/issue", {"userId": USER_B}, 403),
        ("GET", f"/v1/points/{USER_B}", None, 403),
        ("GET", f"/v1/points/{USER_B}/histories", None, 403),
        ("GET", f"/v1/users/{USER_B}/coupons", None, 403),
        ("GET", f"/v1/orders/{order.id}", None, 404),
        ("GET", f"/v1/orders/{order.id}/histories", None, 404),
        ("GET", f"/v1/jobs/{b_job}", None, 404),
        ("GET", f"/v1/jobs/{b_job}?wait=1", None, 404),
    ]
    for method, path, body, status in refused:
        answer = hs_client.open(path, method=method, json=body, headers=a)
        assert_error(answer, status, "FORBIDDEN" if status == 403 else "NOT_FOUND")
        # The same request by B is answered (the refusal was A's token's doing).
        if method == "GET":
            assert hs_client.get(path, headers=b).status_code == 200, path
    assert row_counts(db_session) == before

    # Paying B's order as oneself is a job, FAILED ORDER_NOT_OWNED (as in none mode).
    pay = _accepted(hs_client.post(f"/v1/orders/{order.id}/payment", json={}, headers=a))
    drain_partition(
        runtime,
        partition_for_job(JobKind.ORDER_PAY, {"userId": USER_A}, runtime.settings.partitions),
    )
    job = hs_client.get(f"/v1/jobs/{pay}", headers=a).get_json()
    assert job["error"]["code"] == "ORDER_NOT_OWNED"

    # B's balance, coupons and order are as they were.
    assert hs_client.get(f"/v1/points/{USER_B}", headers=b).get_json()["amount"] == 1_000
    histories = hs_client.get(f"/v1/points/{USER_B}/histories", headers=b).get_json()
    assert histories["total"] == 1
    coupons = hs_client.get(f"/v1/users/{USER_B}/coupons", headers=b).get_json()["items"]
    assert [(c["couponId"], c["usedAt"]) for c in coupons] == [(coupon.id, None)]
    db_session.expire_all()
    b_order = db_session.get(Order, order.id)
    assert b_order is not None
    assert (b_order.status, b_order.version) == ("READY", 1)
    own = db_session.execute(select(Job).where(Job.user_id == USER_B)).scalars().all()
    assert [j.id for j in own] == [uuid.UUID(b_job)]


def test_checks_keep_api_md_order(hs_client: FlaskClient, db_session: Session) -> None:
    """access (401) < content type (415) < validation (400) < userId (403) < existence (404)."""
    a = bearer(hs256(USER_A))
    answer = hs_client.post("/v1/points/charge", data=b"{", content_type="application/json")
    assert_error(answer, 401, "UNAUTHENTICATED")
    answer = hs_client.post(
        "/v1/points/charge", data=b'{"userId": 5}', content_type="text/plain", headers=a
    )
    assert_error(answer, 415, "UNSUPPORTED_MEDIA_TYPE")
    answer = hs_client.post("/v1/points/charge", json={"userId": USER_B, "amount": 0}, headers=a)
    assert_error(answer, 400, "VALIDATION_ERROR", fields={"amount"})
    answer = hs_client.post(
        f"/v1/coupons/1/issue?userId={USER_A}", json={"userId": USER_B}, headers=a
    )
    assert_error(answer, 400, "VALIDATION_ERROR", fields={"userId"})
    assert_error(hs_client.get("/v1/points/0", headers=a), 403, "FORBIDDEN")
    assert_error(hs_client.get("/v1/orders/0", headers=a), 404, "NOT_FOUND")
    assert_error(hs_client.get("/v1/orders/9123456789", headers=a), 404, "NOT_FOUND")


def test_public_calls_take_no_token(hs_client: FlaskClient) -> None:
    product = ProductFactory()
    coupon = CouponFactory()
    for path in (
        "/v1/products",
        f"/v1/products/{product.id}",
        "/v1/products/top",
        f"/v1/coupons/{coupon.id}",
        "/healthz",
        "/openapi.json",
        "/docs",
    ):
        assert hs_client.get(path).status_code == 200, path


def test_idempotency_keys_are_scoped_to_the_token_user(hs_client: FlaskClient) -> None:
    key = {"Idempotency-Key": f"k-{uuid.uuid4()}"}
    a = {**bearer(hs256(USER_A)), **key}
    b = {**bearer(hs256(USER_B)), **key}
    first = _accepted(hs_client.post("/v1/points/charge", json={"amount": 3}, headers=a))
    other = _accepted(hs_client.post("/v1/points/charge", json={"amount": 3}, headers=b))
    again = _accepted(hs_client.post("/v1/points/charge", json={"amount": 3}, headers=a))
    assert first == again != other
    answer = hs_client.post("/v1/points/charge", json={"amount": 4}, headers=b)
    assert_error(answer, 422, "IDEMPOTENCY_KEY_REUSED")


def test_the_rate_limit_counts_per_user(make_app: Callable[..., Flask]) -> None:
    client = make_app(auth_jwt_secret=SECRET, rate_limit="3/minute").test_client()
    first, second = (uuid.uuid4().int % 10**15 + 1 for _ in range(2))
    a, b = bearer(hs256(first)), bearer(hs256(second))
    statuses = [
        client.post("/v1/points/charge", json={"amount": 1}, headers=a).status_code
        for _ in range(4)
    ]
    assert statuses == [202, 202, 202, 429]
    # The same address, another user: its own allowance.
    assert client.post("/v1/points/charge", json={"amount": 1}, headers=b).status_code == 202


# ---- admin ----------------------------------------------------------------------


def _admin_requests(order_id: int, product_id: int) -> dict[tuple[str, str], Any]:
    """One acceptable request per admin call, keyed as OPERATIONS names them."""
    name = f"p-{uuid.uuid4().hex[:8]}"
    return {
        ("POST", "/v1/products"): ("/v1/products", {"name": name, "price": 1, "stock": 1}),
        ("PUT", "/v1/products/<id:product_id>/stock"): (
            f"/v1/products/{product_id}/stock?stock=3",
            None,
        ),
        ("POST", "/v1/coupons"): (
            "/v1/coupons",
            {"name": name, "discountAmount": 1, "totalQuantity": 1},
        ),
        ("PUT", "/v1/orders/<id:order_id>/status"): (
            f"/v1/orders/{order_id}/status?status=FAILED",
            None,
        ),
        ("GET", "/v1/admin/partitions"): ("/v1/admin/partitions", None),
    }


@pytest.mark.parametrize(
    "grant",
    [{"scope": "openid shop:admin"}, {"scp": ["profile", "shop:admin"]}, "ADMIN_TOKEN"],
    ids=["scope", "scp", "ADMIN_TOKEN"],
)
def test_admin_calls_take_the_admin_scope_or_token_and_refuse_customers(
    hs_client: FlaskClient, db_session: Session, grant: Any
) -> None:
    admin_ops = {(op.method, op.rule) for op in OPERATIONS if op.admin}
    product = ProductFactory()
    order = OrderFactory(user_id=USER_A, lines=[(product, 1)])
    db_session.flush()
    calls = _admin_requests(order.id, product.id)
    assert set(calls) == admin_ops  # every admin call is tried
    admin = ADMIN if grant == "ADMIN_TOKEN" else bearer(hs256(USER_A, **grant))
    customers = [
        bearer(hs256(USER_A)),
        bearer(hs256(USER_A, scope="shop:read shop:admins")),
        bearer(hs256(USER_A, scp="shop:admin-ish")),
    ]
    for (method, _), (path, body) in calls.items():
        for customer in customers:
            answer = hs_client.open(path, method=method, json=body, headers=customer)
            assert_error(answer, 403, "FORBIDDEN")
        assert_error(hs_client.open(path, method=method, json=body), 401, "UNAUTHENTICATED")
        answer = hs_client.open(path, method=method, json=body, headers=admin)
        assert answer.status_code in (200, 201, 202), (path, answer.get_data(as_text=True))
        if answer.status_code == 202:
            # A STOCK_SET job is the admins' to read: 404 to a customer.
            job = answer.get_json()["statusUrl"]
            assert hs_client.get(job, headers=admin).status_code == 200
            assert hs_client.get(job, headers=ADMIN).status_code == 200
            assert_error(hs_client.get(job, headers=customers[0]), 404, "NOT_FOUND")
            assert_error(hs_client.get(job + "?wait=1", headers=customers[0]), 404, "NOT_FOUND")


def test_an_admin_reads_any_users_data_but_acts_for_none(hs_client: FlaskClient) -> None:
    admin = bearer(hs256(USER_A, scope="shop:admin"))
    assert hs_client.get(f"/v1/points/{USER_B}", headers=admin).status_code == 200
    assert hs_client.get(f"/v1/points/{USER_B}", headers=ADMIN).status_code == 200
    answer = hs_client.post(
        "/v1/points/charge", json={"userId": USER_B, "amount": 1}, headers=admin
    )
    assert_error(answer, 403, "FORBIDDEN")
    answer = hs_client.post(
        "/v1/points/charge", json={"userId": USER_B, "amount": 1}, headers=ADMIN
    )
    assert_error(answer, 403, "FORBIDDEN")


# ---- JWKS -------------------------------------------------------------------------


class KeyServer:
    """A JWKS endpoint on 127.0.0.1 that counts its fetches."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.fetches += 1
                body = json.dumps({"keys": server.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def key_server() -> Iterator[KeyServer]:
    server = KeyServer()
    yield server
    server.stop()


def _jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    algorithm = jwt.algorithms.RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else None
    if algorithm is not None:
        jwk = json.loads(algorithm.to_jwk(key.public_key()))
    else:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    return {**jwk, "kid": kid, "use": "sig"}


def test_jwks_keys_are_fetched_once_rotated_in_and_refetched_at_most_once_a_minute(
    make_app: Callable[..., Flask],
    key_server: KeyServer,
    rsa_key: rsa.RSAPrivateKey,
    db_session: Session,
) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    key_server.keys = [_jwk(rsa_key, "k1")]
    app = make_app(auth_jwks_url=key_server.url)
    clock = [1_000.0]
    app.extensions["token_verifier"].jwks.clock = lambda: clock[0]
    client = app.test_client()

    def token(key: Any, kid: str, algorithm: str, sub: int = USER_A) -> dict[str, str]:
        return bearer(jwt.encode(claims(sub), key, algorithm=algorithm, headers={"kid": kid}))

    def status(headers: dict[str, str]) -> int:
        return client.get(f"/v1/points/{USER_A}", headers=headers).status_code

    assert key_server.fetches == 0  # fetched on first use, not at start
    assert status(token(rsa_key, "k1", "RS256")) == 200
    assert status(token(rsa_key, "k1", "RS256", sub=USER_A)) == 200
    assert key_server.fetches == 1
    # An HS256 token naming the RSA key's kid: refused (the key's algorithm only).
    assert status(bearer(jwt.encode(claims(USER_A), SECRET, "HS256", headers={"kid": "k1"}))) == 401

    # Rotation: the set gains k2; within the minute of the last fetch it is not fetched ...
    key_server.keys = [_jwk(rsa_key, "k1"), _jwk(ec_key, "k2")]
    assert status(token(ec_key, "k2", "ES256")) == 401
    assert key_server.fetches == 1
    # ... a minute on, the unknown kid fetches the set once, and k2 verifies.
    clock[0] += 61
    assert status(token(ec_key, "k2", "ES256")) == 200
    assert key_server.fetches == 2

    # Unknown kids, however many, fetch at most once a minute.
    for n in range(20):
        assert status(token(ec_key, f"forged-{n}", "ES256")) == 401
    assert key_server.fetches == 2
    clock[0] += 61
    for n in range(20):
        assert status(token(ec_key, f"forged-{n}", "ES256")) == 401
    assert key_server.fetches == 3

    # The key server goes away: cached keys still verify; a kid it would have to fetch
    # cannot be checked: 503, nothing recorded.
    key_server.stop()
    clock[0] += 61
    before = row_counts(db_session)
    assert status(token(ec_key, "k2", "ES256")) == 200
    answer = client.post(
        "/v1/points/charge", json={"amount": 1}, headers=token(ec_key, "k3", "ES256")
    )
    assert_error(answer, 503, "UNAVAILABLE")
    assert row_counts(db_session) == before
    assert status(token(rsa_key, "k1", "RS256")) == 200


def test_jwks_unreachable_without_a_cached_key_is_a_503_with_nothing_recorded(
    make_app: Callable[..., Flask], rsa_key: rsa.RSAPrivateKey, db_session: Session
) -> None:
    url = f"http://127.0.0.1:{free_port()}/jwks.json"  # nothing listens there
    client = make_app(auth_jwks_url=url).test_client()
    headers = bearer(jwt.encode(claims(USER_A), rsa_key, "RS256", headers={"kid": "k1"}))
    before = row_counts(db_session)
    answer = client.post("/v1/points/charge", json={"amount": 1}, headers=headers)
    assert_error(answer, 503, "UNAVAILABLE")
    assert answer.headers["Retry-After"]
    assert row_counts(db_session) == before


# ---- OpenAPI --------------------------------------------------------------------


def test_openapi_in_jwt_mode_declares_the_bearer_scheme_on_every_call_that_takes_it(
    hs_client: FlaskClient,
) -> None:
    document = hs_client.get("/openapi.json").get_json()
    validator = jsonschema_rs.Draft202012Validator(OPENAPI_31)
    assert [e.message for e in validator.iter_errors(document)] == []
    scheme = document["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"], scheme["bearerFormat"]) == ("http", "bearer", "JWT")
    for op in OPERATIONS:
        entry = document["paths"][openapi_path(op.rule)][op.method.lower()]
        if op.admin or op.customer:
            assert entry["security"] == [{"bearerAuth": []}], op.rule
            assert {"401", "403"} <= set(entry["responses"]), op.rule
        else:
            assert "security" not in entry, op.rule
    customers = {openapi_path(op.rule) for op in OPERATIONS if op.customer}
    assert customers == {
        "/v1/points/charge",
        "/v1/points/use",
        "/v1/points/{userId}",
        "/v1/points/{userId}/histories",
        "/v1/orders",
        "/v1/orders/{orderId}",
        "/v1/orders/{orderId}/payment",
        "/v1/orders/{orderId}/histories",
        "/v1/coupons/{couponId}/issue",
        "/v1/users/{userId}/coupons",
        "/v1/jobs/{jobId}",
    }
    schemas = document["components"]["schemas"]
    for name in ("PointsRequest", "OrderCreate", "PaymentBody", "IssueBody"):
        assert "userId" not in schemas[name].get("required", []), name
        assert "token" in schemas[name]["properties"]["userId"]["description"]
    # The page lets a person paste a token and keeps it across reloads.
    assert "persistAuthorization: true" in hs_client.get("/docs").get_data(as_text=True)


def test_openapi_in_none_mode_asks_no_token_of_customer_calls(client: FlaskClient) -> None:
    document = client.get("/openapi.json").get_json()
    entry = document["paths"]["/v1/points/charge"]["post"]
    assert "security" not in entry
    assert document["components"]["schemas"]["PointsRequest"]["required"] == ["userId", "amount"]
