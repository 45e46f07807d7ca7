"""The load harness's invariant checks (bench/checks.py) hold on consistent rows and
catch each kind of violation, on a database of their own (the checks are global)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from bench import checks
from shared.embedded import migrate
from tests.databases import scratch_database

STOCK = 1_000


@pytest.fixture
def url(server_urls: tuple[str, str]) -> Iterator[str]:
    with scratch_database(server_urls[0], f"bench_checks_{uuid.uuid4().hex[:8]}") as db:
        migrate(db)
        yield db


def job(conn: psycopg.Connection[Any], kind: str, payload: dict[str, Any], **cols: Any) -> str:
    job_id = str(uuid.uuid4())
    conn.execute(
        "INSERT INTO jobs (id, kind, partition, payload, status, result, finished_at)"
        " VALUES (%s, %s, 'p.0', %s, %s, %s, CASE WHEN %s = 'PENDING' THEN NULL ELSE now() END)",
        (
            job_id,
            kind,
            json.dumps(payload),
            cols.get("status", "SUCCEEDED"),
            json.dumps(cols["result"]) if "result" in cols else None,
            cols.get("status", "SUCCEEDED"),
        ),
    )
    return job_id


@pytest.fixture
def consistent(url: str) -> dict[str, int]:
    """A service product with two orders, a straight-design product with one, points, a coupon."""
    with checks.connect(url) as conn:
        service, straight = (
            conn.execute(
                "INSERT INTO products (name, price, stock) VALUES (%s, 10, %s) RETURNING id",
                (name, stock),
            ).fetchone()[0]
            for name, stock in (("service", STOCK - 3), ("straight", STOCK - 2))
        )
        for qty in (1, 2):
            job_id = job(
                conn,
                "ORDER_CREATE",
                {"userId": 7, "orderLines": [{"productId": service, "quantity": qty}]},
            )
            order = conn.execute(
                "INSERT INTO orders (user_id, status, total_price, job_id)"
                " VALUES (7, 'READY', 10, %s) RETURNING id",
                (job_id,),
            ).fetchone()[0]
            conn.execute("INSERT INTO order_lines VALUES (%s, %s, %s, 10)", (order, service, qty))
        order = conn.execute(
            "INSERT INTO orders (user_id, status, total_price) VALUES (8, 'READY', 20) RETURNING id"
        ).fetchone()[0]
        conn.execute("INSERT INTO order_lines VALUES (%s, %s, 2, 10)", (order, straight))
        # A FAILED order's lines gave their stock back: they must not count.
        failed = conn.execute(
            "INSERT INTO orders (user_id, status, total_price) VALUES (8, 'FAILED', 5) RETURNING id"
        ).fetchone()[0]
        conn.execute("INSERT INTO order_lines VALUES (%s, %s, 5, 10)", (failed, straight))

        for amount in (50, 30):
            job(conn, "POINTS_CHARGE", {"userId": 7, "amount": amount})
        job(conn, "POINTS_USE", {"userId": 7, "amount": 20})
        job(conn, "POINTS_USE", {"userId": 7, "amount": 999}, status="FAILED")
        conn.execute("INSERT INTO points (user_id, balance) VALUES (7, 60)")
        for kind, amount, after in (("CHARGE", 50, 50), ("CHARGE", 30, 80), ("USE", 20, 60)):
            conn.execute(
                "INSERT INTO point_histories (user_id, type, amount, balance_after)"
                " VALUES (7, %s, %s, %s)",
                (kind, amount, after),
            )

        coupon = conn.execute(
            "INSERT INTO coupons (name, discount_amount, total_quantity, issued_quantity)"
            " VALUES ('c', 5, 2, 2) RETURNING id"
        ).fetchone()[0]
        for user in (7, 8):
            job(conn, "COUPON_ISSUE", {"couponId": coupon, "userId": user})
            conn.execute(
                "INSERT INTO user_coupons (coupon_id, user_id) VALUES (%s, %s)", (coupon, user)
            )
        job(conn, "COUPON_ISSUE", {"couponId": coupon, "userId": 9}, status="FAILED")
    return {"service": service, "straight": straight, "coupon": coupon}


def violations(url: str, ids: dict[str, int]) -> list[str]:
    return checks.check_invariants(
        url, stock=STOCK, service_ids=[ids["service"]], other_ids=[ids["straight"]]
    )


def test_consistent_rows_hold(url: str, consistent: dict[str, int]) -> None:
    assert violations(url, consistent) == []
    assert checks.wait_drained(url, timeout=1) == (pytest.approx(0, abs=1), [])


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        ("UPDATE products SET stock = stock - 1 WHERE name = 'service'", "product"),
        ("UPDATE products SET stock = stock + 1 WHERE name = 'straight'", "product"),
        (
            "UPDATE jobs SET status = 'FAILED' WHERE kind = 'ORDER_CREATE'"
            " AND payload->'orderLines'->0->>'quantity' = '1'",
            "SUCCEEDED ORDER_CREATE units",
        ),
        ("UPDATE points SET balance = balance + 1", "user 7"),
        ("DELETE FROM point_histories WHERE type = 'USE'", "user 7"),
        ("UPDATE point_histories SET balance_after = 61 WHERE type = 'USE'", "user 7"),
        (
            "UPDATE jobs SET status = 'SUCCEEDED' WHERE kind = 'POINTS_USE' AND status = 'FAILED'",
            "user 7",
        ),
        ("UPDATE coupons SET issued_quantity = 1", "coupon"),
        (
            "UPDATE jobs SET status = 'SUCCEEDED'"
            " WHERE kind = 'COUPON_ISSUE' AND status = 'FAILED'",
            "coupon",
        ),
        (
            "UPDATE jobs SET payload = jsonb_set(payload, '{userId}', '7')"
            " WHERE kind = 'COUPON_ISSUE' AND payload->>'userId' = '8'",
            "coupon",
        ),
    ],
)
def test_each_violation_is_caught(
    url: str, consistent: dict[str, int], tamper: str, expected: str
) -> None:
    with checks.connect(url) as conn:
        conn.execute(tamper)
    found = violations(url, consistent)
    assert any(expected in v for v in found), found


def test_a_pending_job_is_a_violation_after_the_drain(url: str) -> None:
    with checks.connect(url) as conn:
        job(conn, "POINTS_CHARGE", {"userId": 1, "amount": 1}, status="PENDING")
    assert checks.pending(url) == {"p.0": 1}
    _, found = checks.wait_drained(url, timeout=0.3)
    assert found == ["1 jobs still PENDING 0 s after the load"]
