"""Hostile input, table-driven, against every job and admin endpoint.

Each case is one raw request.  Whatever it is, the answer is the expected 4xx in
the one JSON error shape (never a 500, never HTML), and no row of jobs,
products, coupons, orders, points or user coupons appears or changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy.orm import Session

from tests.api.conftest import assert_error, row_counts
from tests.conftest import ADMIN

MARK = "__HOSTILE__"


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str
    body: bytes | None
    status: int
    code: str
    fields: set[str] | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """A job or admin endpoint, a valid body, and the body fields that are integers/names."""

    name: str
    method: str
    path: str  # with {id} where a path id goes
    body: dict[str, Any]
    admin: bool
    ints: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # label -> key path
    names: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()  # labels of ints that may be left out (but not null)

    @property
    def headers(self) -> dict[str, str]:
        return dict(ADMIN) if self.admin else {}


TARGETS = [
    Target(
        "charge",
        "POST",
        "/v1/points/charge",
        {"userId": 1, "amount": 10},
        admin=False,
        ints={"userId": ("userId",), "amount": ("amount",)},
    ),
    Target(
        "use",
        "POST",
        "/v1/points/use",
        {"userId": 1, "amount": 10},
        admin=False,
        ints={"userId": ("userId",), "amount": ("amount",)},
    ),
    Target(
        "order",
        "POST",
        "/v1/orders",
        {"userId": 1, "orderLines": [{"productId": 2, "quantity": 3}]},
        admin=False,
        ints={
            "userId": ("userId",),
            "orderLines[0].productId": ("orderLines", 0, "productId"),
            "orderLines[0].quantity": ("orderLines", 0, "quantity"),
        },
    ),
    Target(
        "pay",
        "POST",
        "/v1/orders/{id}/payment",
        {"userId": 1, "couponId": 2},
        admin=False,
        ints={"userId": ("userId",), "couponId": ("couponId",)},
        optional=("couponId",),
    ),
    Target(
        "issue",
        "POST",
        "/v1/coupons/{id}/issue",
        {"userId": 1},
        admin=False,
        ints={"userId": ("userId",)},
    ),
    Target(
        "stock",
        "PUT",
        "/v1/products/{id}/stock",
        {"stock": 5},
        admin=True,
        ints={"stock": ("stock",)},
    ),
    Target(
        "product",
        "POST",
        "/v1/products",
        {"name": "p", "price": 1, "stock": 1},
        admin=True,
        ints={"price": ("price",), "stock": ("stock",)},
        names=("name",),
    ),
    Target(
        "coupon",
        "POST",
        "/v1/coupons",
        {"name": "c", "discountAmount": 1, "totalQuantity": 1},
        admin=True,
        ints={"discountAmount": ("discountAmount",), "totalQuantity": ("totalQuantity",)},
        names=("name",),
    ),
]

# Raw JSON text put in place of a valid integer.
BAD_INTEGERS = {
    "string": '"10"',
    "true": "true",
    "float": "1.5",
    "float-integral": "1.0",
    "null": "null",
    "2^64": str(2**64),
    "2^63": str(2**63),
    "-2^63-1": str(-(2**63) - 1),
    "1e400": "1e400",
    "1e2": "1e2",
    "negative": "-1",
    "huge-digits": "9" * 4000,
    "object": '{"value": 1}',
    "array": "[1]",
}
# Raw JSON text for bad values that are invalid JSON (the field is then not named).
BAD_JSON_VALUES = {
    "NaN": "NaN",
    "Infinity": "Infinity",
    "-Infinity": "-Infinity",
    "hex": "0x10",
    "5000-digits": "9" * 5000,
}
# Names that must be refused: controls, bidi overrides, a lone surrogate, too long.
BAD_NAMES = {
    "nul": '"\\u0000"',
    "nul-inside": '"a\\u0000b"',
    "escape": '"\\u001b[31mred"',
    "newline": '"two\\nlines"',
    "tab": '"a\\tb"',
    "del": '"\\u007f"',
    "c1-nel": '"\\u0085"',
    "rlo": '"\\u202eevil"',
    "rli": '"\\u2067x"',
    "lone-surrogate": '"\\ud800"',
    "201-emoji": json.dumps("\U0001f600" * 201),
    "60k": json.dumps("x" * 60_000),
    "empty": '""',
    "number": "5",
}


def _render(body: dict[str, Any], where: tuple[Any, ...], raw: str) -> bytes:
    """``body`` as JSON with the value at ``where`` replaced by the raw JSON text ``raw``."""
    copy = json.loads(json.dumps(body))
    node = copy
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = MARK
    return json.dumps(copy).replace(json.dumps(MARK), raw).encode()


def _without(body: dict[str, Any], where: tuple[Any, ...]) -> bytes:
    """``body`` as JSON without the key at ``where``."""
    copy = json.loads(json.dumps(body))
    node = copy
    for key in where[:-1]:
        node = node[key]
    del node[where[-1]]
    return json.dumps(copy).encode()


def _path(target: Target, path_id: str = "7") -> str:
    return target.path.replace("{id}", path_id)


def _cases_for(t: Target) -> list[Case]:
    cases: list[Case] = []
    ok_path = _path(t)

    def add(label: str, body: bytes | None, status: int, code: str, **kw: Any) -> None:
        cases.append(
            Case(
                f"{t.name}-{label}",
                kw.pop("method", t.method),
                kw.pop("path", ok_path),
                body,
                status,
                code,
                headers=kw.pop("headers", t.headers),
                **kw,
            )
        )

    valid = json.dumps(t.body).encode()
    for label, where in t.ints.items():
        for bad, raw in BAD_INTEGERS.items():
            add(
                f"{label}-{bad}",
                _render(t.body, where, raw),
                400,
                "VALIDATION_ERROR",
                fields={label},
            )
        for bad, raw in BAD_JSON_VALUES.items():
            add(
                f"{label}-{bad}",
                _render(t.body, where, raw),
                400,
                "VALIDATION_ERROR",
                fields={""},
            )
        if label not in t.optional:
            add(
                f"{label}-missing",
                _without(t.body, where),
                400,
                "VALIDATION_ERROR",
                fields={label},
            )
    for name in t.names:
        for bad, raw in BAD_NAMES.items():
            add(
                f"{name}-{bad}",
                _render(t.body, (name,), raw),
                400,
                "VALIDATION_ERROR",
                fields={name},
            )
    text = valid.decode()
    first_key = next(iter(t.body))
    add(
        "duplicate-key",
        (text[:-1] + f', "{first_key}": {json.dumps(t.body[first_key])}}}').encode(),
        400,
        "VALIDATION_ERROR",
        fields={""},
    )
    add(
        "unknown-field",
        text[:-1].encode() + b', "admin": true}',
        400,
        "VALIDATION_ERROR",
        fields={"admin"},
    )
    add(
        "snake-case",
        text[:-1].encode() + b', "user_id": 1}',
        400,
        "VALIDATION_ERROR",
        fields={"user_id"},
    )
    for top, raw_top in {"array": b"[]", "string": b'"x"', "null": b"null", "number": b"1"}.items():
        add(f"top-level-{top}", raw_top, 400, "VALIDATION_ERROR")
    add("truncated", valid[:-1], 400, "VALIDATION_ERROR", fields={""})
    add("trailing-garbage", valid + b"x", 400, "VALIDATION_ERROR", fields={""})
    add(
        "10000-lines-valid-json",
        b"{" + b"\n" * 10_000 + valid[1:-1] + b', "zz": 1}',
        400,
        "VALIDATION_ERROR",
        fields={"zz"},
    )
    add(
        "10000-lines-over-64k",
        b"[\n" + b"\n".join([valid + b","] * 10_000) + b"\n{}]",
        413,
        "PAYLOAD_TOO_LARGE",
    )
    add("deep-nesting", b"[" * 10_000 + b"]" * 10_000, 400, "VALIDATION_ERROR")
    add("invalid-utf8", valid[:-1] + b', "x": "\xc3\x28"}', 400, "VALIDATION_ERROR")
    if t.admin:
        add("no-token", b"{nope", 401, "UNAUTHENTICATED", headers={})
        add("wrong-token", b"{nope", 403, "FORBIDDEN", headers={"Authorization": "Bearer x"})
        add(
            "token-in-query",
            valid,
            401,
            "UNAUTHENTICATED",
            headers={},
            path=ok_path + "?token=test-admin-token&access_token=test-admin-token",
        )
    if "{id}" in t.path:
        for bad_id in ("0", "-1", str(2**63), str(2**64), "1.0", "abc", "%00"):
            add(f"path-id-{bad_id}", valid, 404, "NOT_FOUND", path=_path(t, bad_id))
    return cases


ORDER_STATUS = "/v1/orders/7/status"
EXTRA_CASES = [
    Case(
        "pay-no-body",
        "POST",
        "/v1/orders/7/payment",
        None,
        400,
        "VALIDATION_ERROR",
        {""},
    ),
    Case(
        "pay-only-coupon",
        "POST",
        "/v1/orders/7/payment",
        b'{"couponId": 2}',
        400,
        "VALIDATION_ERROR",
        {"userId"},
    ),
    Case(
        "pay-both-bad",
        "POST",
        "/v1/orders/7/payment",
        b'{"userId": "1", "couponId": 0}',
        400,
        "VALIDATION_ERROR",
        {"userId", "couponId"},
    ),
    Case(
        "pay-form-encoded",
        "POST",
        "/v1/orders/7/payment",
        b"userId=1",
        415,
        "UNSUPPORTED_MEDIA_TYPE",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ),
    Case("top-days-0", "GET", "/v1/products/top?days=0", None, 400, "VALIDATION_ERROR", {"days"}),
    Case("top-days-31", "GET", "/v1/products/top?days=31", None, 400, "VALIDATION_ERROR", {"days"}),
    Case(
        "top-days-float",
        "GET",
        "/v1/products/top?days=1.5",
        None,
        400,
        "VALIDATION_ERROR",
        {"days"},
    ),
    Case(
        "top-days-arabic-digit",
        "GET",
        "/v1/products/top?days=%D9%A3",
        None,
        400,
        "VALIDATION_ERROR",
        {"days"},
    ),
    Case(
        "top-limit-0", "GET", "/v1/products/top?limit=0", None, 400, "VALIDATION_ERROR", {"limit"}
    ),
    Case(
        "top-limit-101",
        "GET",
        "/v1/products/top?limit=101",
        None,
        400,
        "VALIDATION_ERROR",
        {"limit"},
    ),
    Case(
        "top-both-bad",
        "GET",
        f"/v1/products/top?days=-1&limit={2**64}",
        None,
        400,
        "VALIDATION_ERROR",
        {"days", "limit"},
    ),
    Case("top-post", "POST", "/v1/products/top", b"{}", 405, "METHOD_NOT_ALLOWED"),
    Case(
        "status-nul",
        "PUT",
        f"{ORDER_STATUS}?status=%00",
        None,
        400,
        "VALIDATION_ERROR",
        {"status"},
        dict(ADMIN),
    ),
    Case(
        "status-suffix-nul",
        "PUT",
        f"{ORDER_STATUS}?status=READY%00",
        None,
        400,
        "VALIDATION_ERROR",
        {"status"},
        dict(ADMIN),
    ),
    Case(
        "status-lower",
        "PUT",
        f"{ORDER_STATUS}?status=failed",
        None,
        400,
        "VALIDATION_ERROR",
        {"status"},
        dict(ADMIN),
    ),
    Case(
        "status-emoji",
        "PUT",
        f"{ORDER_STATUS}?status=%F0%9F%98%80",
        None,
        400,
        "VALIDATION_ERROR",
        {"status"},
        dict(ADMIN),
    ),
    Case(
        "status-huge",
        "PUT",
        f"{ORDER_STATUS}?status={'A' * 5000}",
        None,
        400,
        "VALIDATION_ERROR",
        {"status"},
        dict(ADMIN),
    ),
    Case(
        "status-if-match-garbage",
        "PUT",
        f"{ORDER_STATUS}?status=FAILED",
        None,
        400,
        "VALIDATION_ERROR",
        {"If-Match"},
        {**ADMIN, "If-Match": "1; DROP TABLE orders"},
    ),
    Case(
        "status-if-match-negative",
        "PUT",
        f"{ORDER_STATUS}?status=FAILED",
        None,
        400,
        "VALIDATION_ERROR",
        {"If-Match"},
        {**ADMIN, "If-Match": "-1"},
    ),
    Case("status-no-token", "PUT", f"{ORDER_STATUS}?status=NOPE", None, 401, "UNAUTHENTICATED"),
    Case(
        "status-wrong-token",
        "PUT",
        f"{ORDER_STATUS}?status=NOPE",
        None,
        403,
        "FORBIDDEN",
        headers={"Authorization": "Bearer " + "x" * 5000},
    ),
    Case(
        "status-path-id-0",
        "PUT",
        "/v1/orders/0/status?status=FAILED",
        None,
        404,
        "NOT_FOUND",
        headers=dict(ADMIN),
    ),
    Case(
        "status-path-id-2^63",
        "PUT",
        f"/v1/orders/{2**63}/status?status=FAILED",
        None,
        404,
        "NOT_FOUND",
        headers=dict(ADMIN),
    ),
    Case(
        "stock-query-arabic-digit",
        "PUT",
        "/v1/products/7/stock?stock=%D9%A3",
        None,
        400,
        "VALIDATION_ERROR",
        {"stock"},
        dict(ADMIN),
    ),
    Case(
        "stock-query-fullwidth-digit",
        "PUT",
        "/v1/products/7/stock?stock=%EF%BC%93",
        None,
        400,
        "VALIDATION_ERROR",
        {"stock"},
        dict(ADMIN),
    ),
    Case(
        "stock-query-newline",
        "PUT",
        "/v1/products/7/stock?stock=3%0A",
        None,
        400,
        "VALIDATION_ERROR",
        {"stock"},
        dict(ADMIN),
    ),
    Case(
        "stock-query-exponent",
        "PUT",
        "/v1/products/7/stock?stock=1e3",
        None,
        400,
        "VALIDATION_ERROR",
        {"stock"},
        dict(ADMIN),
    ),
    Case(
        "stock-query-2^64",
        "PUT",
        f"/v1/products/7/stock?stock={2**64}",
        None,
        400,
        "VALIDATION_ERROR",
        {"stock"},
        dict(ADMIN),
    ),
    Case(
        "stock-query-and-body-differ",
        "PUT",
        "/v1/products/7/stock?stock=3",
        b'{"stock": 4}',
        400,
        "VALIDATION_ERROR",
        {"stock"},
        {**ADMIN, "Content-Type": "application/json"},
    ),
    Case(
        "issue-query-bool",
        "POST",
        "/v1/coupons/7/issue?userId=true",
        None,
        400,
        "VALIDATION_ERROR",
        {"userId"},
    ),
    Case(
        "issue-query-zero",
        "POST",
        "/v1/coupons/7/issue?userId=0",
        None,
        400,
        "VALIDATION_ERROR",
        {"userId"},
    ),
    Case(
        "issue-query-nul",
        "POST",
        "/v1/coupons/7/issue?userId=%00",
        None,
        400,
        "VALIDATION_ERROR",
        {"userId"},
    ),
    Case("partitions-no-token", "GET", "/v1/admin/partitions", None, 401, "UNAUTHENTICATED"),
    Case(
        "partitions-token-in-query",
        "GET",
        "/v1/admin/partitions?token=test-admin-token&access_token=test-admin-token",
        None,
        401,
        "UNAUTHENTICATED",
    ),
    Case(
        "partitions-huge-token",
        "GET",
        "/v1/admin/partitions",
        None,
        403,
        "FORBIDDEN",
        headers={"Authorization": "Bearer " + "x" * 5000},
    ),
    Case(
        "partitions-basic-scheme",
        "GET",
        "/v1/admin/partitions",
        None,
        403,
        "FORBIDDEN",
        headers={"Authorization": "Basic dGVzdC1hZG1pbi10b2tlbjo="},
    ),
    Case(
        "partitions-token-with-nul",
        "GET",
        "/v1/admin/partitions",
        None,
        403,
        "FORBIDDEN",
        headers={"Authorization": "Bearer test-admin-token\x00"},
    ),
    Case(
        "partitions-body-no-token",
        "GET",
        "/v1/admin/partitions",
        b"{nope",
        401,
        "UNAUTHENTICATED",
    ),
    Case(
        "partitions-post",
        "POST",
        "/v1/admin/partitions",
        b"{}",
        405,
        "METHOD_NOT_ALLOWED",
        headers=dict(ADMIN),
    ),
    Case(
        "partitions-sub-path",
        "GET",
        "/v1/admin/partitions/user.0",
        None,
        404,
        "NOT_FOUND",
        headers=dict(ADMIN),
    ),
    Case(
        "charge-idempotency-key-control",
        "POST",
        "/v1/points/charge",
        b'{"userId": 1, "amount": 1}',
        400,
        "VALIDATION_ERROR",
        {"Idempotency-Key"},
        {"Content-Type": "application/json", "Idempotency-Key": "a\x01b"},
    ),
]

CASES = [case for target in TARGETS for case in _cases_for(target)] + EXTRA_CASES


def test_every_target_has_its_cases() -> None:
    assert len({c.id for c in CASES}) == len(CASES)
    assert len(CASES) > 300


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_a_clear_4xx_and_changes_nothing(
    client: FlaskClient, db_session: Session, case: Case
) -> None:
    before = row_counts(db_session)
    headers = dict(case.headers)
    content_type = headers.pop("Content-Type", "application/json" if case.body else None)
    answer = client.open(
        case.path,
        method=case.method,
        data=case.body,
        content_type=content_type,
        headers=headers,
    )
    assert_error(answer, case.status, case.code, fields=case.fields)
    assert row_counts(db_session) == before
