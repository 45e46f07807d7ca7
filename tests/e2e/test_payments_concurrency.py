"""Payments over HTTP against the real stack: one winner per order, one use per coupon,
books that balance while charges, uses, payments, admin changes and the expiry race.

Each test prints a ``PAYMENT-FIGURES`` line (rounds, winners, counts) for the record.
"""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import pytest
import requests
from sqlalchemy import Engine, text

from tests.conftest import ADMIN, wait_job
from tests.e2e.helpers import (
    accepted,
    create_coupon,
    create_product,
    error_code,
    get_json,
    poll_until,
    post_order,
    run_concurrently,
    settle,
    sql_rows,
    sql_scalar,
)
from tests.stack import Stack

pytestmark = pytest.mark.e2e


def _charge(http: requests.Session, base: str, user: int, amount: int) -> str:
    return accepted(
        http.post(f"{base}/v1/points/charge", json={"userId": user, "amount": amount}, timeout=60)
    )


def _use(http: requests.Session, base: str, user: int, amount: int) -> str:
    return accepted(
        http.post(f"{base}/v1/points/use", json={"userId": user, "amount": amount}, timeout=60)
    )


def _pay(
    http: requests.Session, base: str, order_id: int, user: int, coupon_id: int | None = None
) -> str:
    body: dict[str, int] = {"userId": user}
    if coupon_id is not None:
        body["couponId"] = coupon_id
    return accepted(http.post(f"{base}/v1/orders/{order_id}/payment", json=body, timeout=60))


def _fail(http: requests.Session, base: str, order_id: int) -> requests.Response:
    return http.put(
        f"{base}/v1/orders/{order_id}/status",
        params={"status": "FAILED"},
        headers=ADMIN,
        timeout=60,
    )


def _orders(
    http: requests.Session, base: str, engine: Engine, wanted: list[tuple[int, int, int]]
) -> list[int]:
    """Place ``(user, product, quantity)`` orders concurrently; their ids, in that order."""
    job_ids = run_concurrently(lambda w: post_order(http, base, w[0], [(w[1], w[2])]), wanted)
    jobs = settle(http, base, engine, job_ids)
    assert [j["status"] for j in jobs] == ["SUCCEEDED"] * len(jobs), Counter(
        error_code(j) for j in jobs
    )
    return [int(j["result"]["orderId"]) for j in jobs]


def _charged(http: requests.Session, base: str, engine: Engine, amounts: dict[int, int]) -> None:
    job_ids = run_concurrently(lambda u: _charge(http, base, u, amounts[u]), list(amounts))
    assert {j["status"] for j in settle(http, base, engine, job_ids)} == {"SUCCEEDED"}


def _check_books(engine: Engine, users: list[int]) -> None:
    """Every balance equals its history, whose chain of balanceAfter is unbroken."""
    rows = sql_rows(
        engine,
        "SELECT user_id, type, amount, balance_after, order_id FROM point_histories"
        " WHERE user_id = ANY(:u) ORDER BY id",
        u=users,
    )
    running: defaultdict[int, int] = defaultdict(int)
    for user, kind, amount, after, order_id in rows:
        running[user] += amount if kind == "CHARGE" else -amount
        assert running[user] == after, (user, kind, amount, after)
        assert after >= 0
        assert (kind == "PAYMENT") == (order_id is not None)
    balances = dict(
        sql_rows(engine, "SELECT user_id, balance FROM points WHERE user_id = ANY(:u)", u=users)
    )
    assert {u: balances.get(u, 0) for u in users} == {u: running[u] for u in users}


def _check_payments_match_orders(engine: Engine, order_ids: list[int]) -> None:
    """A COMPLETED order paid with points has exactly one PAYMENT row of its amount; any
    other order has none; a coupon is used by the order that names it, and only that one."""
    orders = sql_rows(
        engine,
        "SELECT o.id, o.user_id, o.status, o.paid_amount, o.discount_amount, o.coupon_id,"
        " o.total_price, o.expires_at,"
        " (SELECT count(*) FROM point_histories h WHERE h.order_id = o.id) AS debits,"
        " (SELECT sum(amount) FROM point_histories h WHERE h.order_id = o.id) AS debited,"
        " (SELECT count(*) FROM user_coupons c WHERE c.order_id = o.id) AS coupons"
        " FROM orders o WHERE o.id = ANY(:o)",
        o=order_ids,
    )
    assert len(orders) == len(order_ids)
    for o in orders:
        if o.paid_amount is not None:
            assert o.status == "COMPLETED"
            assert (o.debits, o.debited) == (1, o.paid_amount), o
            assert o.paid_amount + o.discount_amount == o.total_price
            assert o.coupons == (1 if o.coupon_id is not None else 0), o
        else:
            assert (o.debits, o.coupons) == (0, 0), o
        assert (o.expires_at is None) == (o.status in ("COMPLETED", "FAILED")), o


def _check_stock_and_sales(engine: Engine, product_id: int, initial: int) -> None:
    """Stock = initial - units of the orders not FAILED (returned at most once), and the
    best-seller aggregate holds exactly those units."""
    kept = sql_scalar(
        engine,
        "SELECT coalesce(sum(l.quantity), 0) FROM order_lines l JOIN orders o"
        " ON o.id = l.order_id WHERE l.product_id = :p AND o.status <> 'FAILED'",
        p=product_id,
    )
    stock = sql_scalar(engine, "SELECT stock FROM products WHERE id = :p", p=product_id)
    sales = sql_scalar(
        engine,
        "SELECT coalesce(sum(units), 0) FROM product_sales WHERE product_id = :p",
        p=product_id,
    )
    assert (stock, sales) == (initial - kept, kept)


def _outbox(engine: Engine, order_ids: list[int]) -> dict[int, list[str]]:
    states: defaultdict[int, list[str]] = defaultdict(list)
    for order_id, status in sql_rows(
        engine,
        "SELECT order_id, status FROM outbox WHERE order_id = ANY(:o) ORDER BY id",
        o=order_ids,
    ):
        states[order_id].append(status)
    return dict(states)


def _histories_delivered(engine: Engine, order_ids: list[int]) -> None:
    """Every state an order entered gets exactly one history row (polled: the listener)."""
    expected = sql_scalar(
        engine, "SELECT count(*) FROM outbox WHERE order_id = ANY(:o)", o=order_ids
    )

    def delivered() -> bool | None:
        got = sql_scalar(
            engine, "SELECT count(*) FROM order_histories WHERE order_id = ANY(:o)", o=order_ids
        )
        return True if got == expected else None

    poll_until(delivered, 30, "order histories of the outbox rows")


# ---- one order, many payments ---------------------------------------------------------


def test_50_concurrent_payments_of_one_order_make_one_payment_and_one_debit(
    stack: Stack, http: requests.Session, engine: Engine, unique_id: Callable[[], int]
) -> None:
    base = stack.base_url
    user = unique_id()
    product = create_product(http, base, stock=10, price=300)
    assert wait_job(http, base, _charge(http, base, user, 10_000))["status"] == "SUCCEEDED"
    job = wait_job(http, base, post_order(http, base, user, [(product["id"], 2)]))
    order_id = job["result"]["orderId"]

    job_ids = run_concurrently(lambda _: _pay(http, base, order_id, user), range(50), 50)
    jobs = settle(http, base, engine, job_ids)

    outcomes = Counter(j["status"] for j in jobs)
    assert outcomes == {"SUCCEEDED": 1, "FAILED": 49}
    assert Counter(error_code(j) for j in jobs if j["status"] == "FAILED") == {
        "ORDER_NOT_PAYABLE": 49
    }
    winner = next(j for j in jobs if j["status"] == "SUCCEEDED")
    assert winner["kind"] == "ORDER_PAY"
    assert winner["result"] == {
        "orderId": order_id,
        "status": "COMPLETED",
        "paidAmount": 600,
        "discountAmount": 0,
        "balance": 9_400,
    }
    debits = sql_rows(
        engine, "SELECT job_id::text, amount FROM point_histories WHERE order_id = :o", o=order_id
    )
    assert debits == [(winner["jobId"], 600)]
    assert get_json(http, f"{base}/v1/points/{user}")["amount"] == 9_400
    order = get_json(http, f"{base}/v1/orders/{order_id}")
    assert (order["status"], order["version"], order["expiresAt"]) == ("COMPLETED", 2, None)
    assert order["payment"]["paidAmount"] == 600
    assert _outbox(engine, [order_id]) == {order_id: ["READY", "COMPLETED"]}
    _histories_delivered(engine, [order_id])
    _check_books(engine, [user])
    print(
        f"\nPAYMENT-FIGURES one-order: payments=50 succeeded={outcomes['SUCCEEDED']}"
        f" failed={outcomes['FAILED']} debits={len(debits)}"
    )


# ---- a payment racing an admin FAILED ---------------------------------------------------


def test_payment_racing_admin_failed_has_one_winner_every_round(
    stack: Stack, http: requests.Session, engine: Engine, unique_id: Callable[[], int]
) -> None:
    base = stack.base_url
    rounds = 60
    initial = rounds * 2
    product = create_product(http, base, stock=initial, price=150)
    users = [unique_id() for _ in range(rounds)]
    _charged(http, base, engine, dict.fromkeys(users, 1_000))
    order_ids = _orders(http, base, engine, [(u, product["id"], 2) for u in users])
    rng = random.Random(11)
    # The PUT leaves 0-250 ms after the payment's 202, around when the partition worker
    # applies the payment, so either may reach the order row first.
    delays = [rng.uniform(0, 0.25) for _ in range(rounds)]

    def race(n: int) -> tuple[str, int]:
        job_id = _pay(http, base, order_ids[n], users[n])
        time.sleep(delays[n])  # the race's offset, not a wait for an outcome
        return job_id, _fail(http, base, order_ids[n]).status_code

    raced = run_concurrently(race, range(rounds), 20)
    jobs = settle(http, base, engine, [job for job, _ in raced])

    winners: Counter[str] = Counter()
    for n, ((_, put), job) in enumerate(zip(raced, jobs, strict=True)):
        paid = job["status"] == "SUCCEEDED"
        failed = put == 200
        assert paid != failed, (n, job, put)  # exactly one winner
        if paid:
            assert put == 409
            winners["payment"] += 1
        else:
            assert error_code(job) == "ORDER_NOT_PAYABLE", job
            winners["admin FAILED"] += 1
    statuses = dict(
        sql_rows(engine, "SELECT id, status FROM orders WHERE id = ANY(:o)", o=order_ids)
    )
    assert Counter(statuses.values()) == Counter(
        COMPLETED=winners["payment"], FAILED=winners["admin FAILED"]
    )
    outbox = _outbox(engine, order_ids)
    for order_id in order_ids:
        assert outbox[order_id] == ["READY", statuses[order_id]]
    _check_stock_and_sales(engine, product["id"], initial)
    assert get_json(http, f"{base}/v1/products/{product['id']}")["stock"] == (
        initial - 2 * winners["payment"]
    )
    _check_books(engine, users)
    _check_payments_match_orders(engine, order_ids)
    balances = dict(
        sql_rows(engine, "SELECT user_id, balance FROM points WHERE user_id = ANY(:u)", u=users)
    )
    assert sum(1_000 - balances[u] for u in users) == 300 * winners["payment"]
    _histories_delivered(engine, order_ids)
    print(
        f"\nPAYMENT-FIGURES payment-vs-admin-FAILED: rounds={rounds}"
        f" payment-won={winners['payment']} admin-won={winners['admin FAILED']}"
        f" double-winners=0 stock={initial}->{initial - 2 * winners['payment']}"
    )


# ---- a payment racing the expiry ----------------------------------------------------------


def test_payment_racing_the_expiry_has_one_winner_every_round(
    stack: Stack, http: requests.Session, engine: Engine, unique_id: Callable[[], int]
) -> None:
    base = stack.base_url
    rounds = 60
    initial = rounds * 3
    product = create_product(http, base, stock=initial, price=100)
    users = [unique_id() for _ in range(rounds)]
    _charged(http, base, engine, dict.fromkeys(users, 1_000))
    order_ids = _orders(http, base, engine, [(u, product["id"], 3) for u in users])
    rng = random.Random(12)
    # Each order comes due a little before or after its payment is sent; beat's expiry
    # runs every second, so some payments meet an order past due but not yet FAILED,
    # and some meet the expiry's own transaction.
    offsets = [rng.uniform(-0.2, 1.2) for _ in range(rounds)]
    due_at: dict[int, Any] = {}

    def race(n: int) -> str:
        with engine.begin() as conn:  # committed: the stack's beat must see it
            due_at[order_ids[n]] = conn.execute(
                text(
                    "UPDATE orders SET expires_at = clock_timestamp() + make_interval(secs => :s)"
                    " WHERE id = :o AND status = 'READY' RETURNING expires_at"
                ),
                {"s": offsets[n], "o": order_ids[n]},
            ).scalar_one()
        return _pay(http, base, order_ids[n], users[n])

    job_ids = run_concurrently(race, range(rounds), 20)
    jobs = settle(http, base, engine, job_ids)

    def all_final() -> dict[int, str] | None:
        rows = dict(
            sql_rows(engine, "SELECT id, status FROM orders WHERE id = ANY(:o)", o=order_ids)
        )
        return rows if set(rows.values()) <= {"COMPLETED", "FAILED"} else None

    statuses = poll_until(all_final, 60, "every raced order paid or expired")
    winners: Counter[str] = Counter()
    for order_id, job in zip(order_ids, jobs, strict=True):
        if job["status"] == "SUCCEEDED":
            assert statuses[order_id] == "COMPLETED", (order_id, job)
            winners["payment"] += 1
        else:
            assert error_code(job) == "ORDER_NOT_PAYABLE", job
            assert statuses[order_id] == "FAILED", order_id
            winners["expiry"] += 1
    outbox = _outbox(engine, order_ids)
    for order_id in order_ids:
        assert outbox[order_id] == ["READY", statuses[order_id]]
    lags = [
        (failed_at - due_at[order_id]).total_seconds()
        for order_id, failed_at in sql_rows(
            engine,
            "SELECT order_id, created_at FROM outbox WHERE order_id = ANY(:o)"
            " AND status = 'FAILED'",
            o=order_ids,
        )
    ]
    assert all(lag >= 0 for lag in lags), lags  # never failed before it was due
    failed_at = dict(
        sql_rows(
            engine,
            "SELECT order_id, created_at FROM outbox WHERE order_id = ANY(:o)"
            " AND status = 'FAILED'",
            o=order_ids,
        )
    )
    finished = dict(
        sql_rows(
            engine,
            "SELECT id::text, finished_at FROM jobs WHERE id = ANY(:j)",
            j=[uuid.UUID(j) for j in job_ids],
        )
    )
    # Refused as past due while the order was still READY (the expiry came after).
    early_refusals = sum(
        1
        for order_id, job in zip(order_ids, jobs, strict=True)
        if job["status"] == "FAILED" and finished[job["jobId"]] < failed_at[order_id]
    )
    _check_stock_and_sales(engine, product["id"], initial)
    assert get_json(http, f"{base}/v1/products/{product['id']}")["stock"] == (
        initial - 3 * winners["payment"]
    )
    _check_books(engine, users)
    _check_payments_match_orders(engine, order_ids)
    _histories_delivered(engine, order_ids)
    print(
        f"\nPAYMENT-FIGURES payment-vs-expiry: rounds={rounds} payment-won={winners['payment']}"
        f" expiry-won={winners['expiry']} double-winners=0"
        f" refused-past-due-before-expiry={early_refusals}"
        f" expiry-lag-max={max(lags, default=0):.2f}s"
    )


# ---- one coupon, two orders --------------------------------------------------------------


def test_one_coupon_on_two_orders_paid_at_once_is_used_once(
    stack: Stack, http: requests.Session, engine: Engine, unique_id: Callable[[], int]
) -> None:
    base = stack.base_url
    rounds = 40
    coupon = create_coupon(http, base, total=rounds, discount=250)
    product = create_product(http, base, stock=rounds * 2, price=200)
    users = [unique_id() for _ in range(rounds)]
    issues = run_concurrently(
        lambda u: accepted(
            http.post(f"{base}/v1/coupons/{coupon['id']}/issue", json={"userId": u}, timeout=60)
        ),
        users,
    )
    assert {j["status"] for j in settle(http, base, engine, issues)} == {"SUCCEEDED"}
    _charged(http, base, engine, dict.fromkeys(users, 1_000))
    pairs = _orders(http, base, engine, [(u, product["id"], 1) for u in users for _ in (0, 1)])

    attempts = [(pairs[2 * n + k], users[n]) for n in range(rounds) for k in (0, 1)]
    job_ids = run_concurrently(lambda a: _pay(http, base, a[0], a[1], coupon["id"]), attempts)
    jobs = settle(http, base, engine, job_ids)

    used_by: dict[int, int] = dict(
        sql_rows(
            engine,
            "SELECT user_id, order_id FROM user_coupons"
            " WHERE coupon_id = :c AND used_at IS NOT NULL",
            c=coupon["id"],
        )
    )
    for n, user in enumerate(users):
        first, second = jobs[2 * n], jobs[2 * n + 1]
        assert Counter(j["status"] for j in (first, second)) == {"SUCCEEDED": 1, "FAILED": 1}
        won, lost = (first, second) if first["status"] == "SUCCEEDED" else (second, first)
        assert error_code(lost) == "COUPON_ALREADY_USED", lost
        # 200 - min(250, 200): the discount covers the whole order.
        assert (won["result"]["paidAmount"], won["result"]["discountAmount"]) == (0, 200)
        assert used_by[user] == won["result"]["orderId"]
    assert len(used_by) == rounds
    _check_books(engine, users)
    _check_payments_match_orders(engine, pairs)
    assert (
        sql_scalar(
            engine, "SELECT count(*) FROM orders WHERE id = ANY(:o) AND status = 'READY'", o=pairs
        )
        == rounds
    )
    print(
        f"\nPAYMENT-FIGURES one-coupon-two-orders: rounds={rounds} payments={len(jobs)}"
        f" coupon-uses={len(used_by)} refused-already-used={rounds}"
    )


# ---- 200 users: payments, charges and uses at once -----------------------------------------


def test_200_users_paying_while_charging_and_using_keep_every_balance_equal_to_its_history(
    stack: Stack, http: requests.Session, engine: Engine, unique_id: Callable[[], int]
) -> None:
    base = stack.base_url
    rng = random.Random(13)
    users = [unique_id() for _ in range(200)]
    products = [create_product(http, base, stock=1_000, price=price) for price in (90, 160, 250)]
    _charged(http, base, engine, {u: rng.randint(1, 1_500) for u in users})
    order_ids = _orders(
        http,
        base,
        engine,
        [(u, rng.choice(products)["id"], rng.randint(1, 4)) for u in users],
    )
    order_of = dict(zip(users, order_ids, strict=True))
    work: list[tuple[str, int, int]] = []
    for user in users:
        work.append(("pay", user, order_of[user]))
        work += [("charge", user, rng.randint(1, 600)) for _ in range(2)]
        work += [("use", user, rng.randint(1, 600)) for _ in range(2)]
    rng.shuffle(work)

    def send(item: tuple[str, int, int]) -> str:
        kind, user, value = item
        if kind == "pay":
            return _pay(http, base, value, user)
        return (_charge if kind == "charge" else _use)(http, base, user, value)

    job_ids = run_concurrently(send, work)
    jobs = settle(http, base, engine, job_ids, timeout=180)

    outcomes: Counter[tuple[str, str]] = Counter()
    for (kind, _, _), job in zip(work, jobs, strict=True):
        outcomes[(kind, job["status"])] += 1
        if job["status"] == "FAILED":
            assert error_code(job) == "INSUFFICIENT_POINTS", job
    # Every succeeded job has exactly one history row, every failed one none.
    rows = dict(
        sql_rows(
            engine,
            "SELECT job_id::text, balance_after FROM point_histories WHERE job_id = ANY(:j)",
            j=[uuid.UUID(j) for j in job_ids],
        )
    )
    succeeded = {j["jobId"]: j for j in jobs if j["status"] == "SUCCEEDED"}
    assert set(rows) == set(succeeded)
    for job_id, job in succeeded.items():
        balance = job["result"].get("balance", job["result"].get("amount"))
        assert rows[job_id] == balance, job
    _check_books(engine, users)
    _check_payments_match_orders(engine, order_ids)
    paid = sql_scalar(
        engine,
        "SELECT count(*) FROM orders WHERE id = ANY(:o) AND status = 'COMPLETED'",
        o=order_ids,
    )
    assert paid == outcomes[("pay", "SUCCEEDED")]
    assert outcomes[("pay", "SUCCEEDED")] > 0
    print(
        "\nPAYMENT-FIGURES 200-users: jobs="
        f"{len(jobs)} "
        + " ".join(f"{k}-{s}={n}" for (k, s), n in sorted(outcomes.items()))
        + f" orders-paid={paid}"
    )
