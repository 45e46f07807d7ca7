"""Orders over HTTP against the real stack: no oversell, all lines or none, one winner."""

from __future__ import annotations

import random
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import requests
from sqlalchemy import Engine

from tests.conftest import ADMIN, wait_job
from tests.e2e.helpers import (
    both_auth_modes,
    create_product,
    create_products_on_distinct_partitions,
    error_code,
    get_json,
    post_order,
    product_partition,
    run_concurrently,
    settle,
    sql_rows,
    sql_scalar,
)
from tests.stack import Stack

pytestmark = pytest.mark.e2e


@both_auth_modes
def test_1000_concurrent_orders_on_stock_100_sell_exactly_100(
    stack: Stack, http: requests.Session, engine: Engine, unique_id: Callable[[], int]
) -> None:
    base = stack.base_url
    product = create_product(http, base, stock=100, price=250)
    pid = product["id"]
    users = [unique_id() for _ in range(1000)]

    # A watcher reads the stock through the API and SQL while the orders are applied.
    seen_api: list[int] = []
    seen_sql: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen_api.append(get_json(http, f"{base}/v1/products/{pid}")["stock"])
            seen_sql.append(sql_scalar(engine, "SELECT stock FROM products WHERE id = :p", p=pid))
            stop.wait(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        job_ids = run_concurrently(lambda u: post_order(http, base, u, [(pid, 1)]), users)
        jobs = settle(http, base, engine, job_ids)
    finally:
        stop.set()
        watcher.join(30)

    succeeded = [(u, j) for u, j in zip(users, jobs, strict=True) if j["status"] == "SUCCEEDED"]
    failed = [j for j in jobs if j["status"] == "FAILED"]
    assert len(succeeded) == 100
    assert len(failed) == 900
    assert Counter(error_code(j) for j in failed) == {"INSUFFICIENT_STOCK": 900}
    assert all(j["kind"] == "ORDER_CREATE" for j in jobs)
    assert all(j["result"]["status"] == "READY" for _, j in succeeded)
    order_ids = [j["result"]["orderId"] for _, j in succeeded]
    assert len(set(order_ids)) == 100

    # Stock: exactly 0 through the API (cache) and in SQL, never negative on the way.
    assert get_json(http, f"{base}/v1/products/{pid}")["stock"] == 0
    assert sql_scalar(engine, "SELECT stock FROM products WHERE id = :p", p=pid) == 0
    assert seen_sql, "the watcher read nothing"
    assert min(seen_api + seen_sql) >= 0
    assert max(seen_api + seen_sql) <= 100
    assert seen_sql == sorted(seen_sql, reverse=True), "stock went back up"

    # One order row (with its one line) per success, none for a failure.
    job_uuids = [uuid.UUID(j["jobId"]) for j in jobs]
    rows = sql_rows(
        engine,
        "SELECT o.id, o.user_id, o.job_id, o.status, o.total_price, l.product_id, l.quantity,"
        " l.unit_price FROM orders o JOIN order_lines l ON l.order_id = o.id"
        " WHERE o.job_id = ANY(:ids)",
        ids=job_uuids,
    )
    assert len(rows) == 100
    assert sorted(r.id for r in rows) == sorted(order_ids)
    by_job = {str(r.job_id): r for r in rows}
    for user, job in succeeded:
        row = by_job[job["jobId"]]
        assert (row.id, row.user_id, row.status) == (job["result"]["orderId"], user, "READY")
        assert (row.product_id, row.quantity, row.unit_price, row.total_price) == (pid, 1, 250, 250)
    assert (
        sql_scalar(engine, "SELECT count(*) FROM order_lines WHERE product_id = :p", p=pid) == 100
    )
    # Every job ran on the product's partition.
    partitions = sql_rows(
        engine, "SELECT DISTINCT partition FROM jobs WHERE id = ANY(:ids)", ids=job_uuids
    )
    assert [p[0] for p in partitions] == [product_partition(pid)]

    # A sample of the orders read through the API.
    for _, job in succeeded[:10]:
        order = get_json(http, f"{base}/v1/orders/{job['result']['orderId']}")
        assert order["status"] == "READY"
        assert order["version"] == 1
        assert order["orderLines"] == [{"productId": pid, "quantity": 1, "unitPrice": 250}]


def test_orders_spanning_partitions_take_all_lines_or_nothing(
    stack: Stack, http: requests.Session, engine: Engine, unique_id: Callable[[], int]
) -> None:
    base = stack.base_url
    stock = 60
    products = create_products_on_distinct_partitions(http, base, 3, stock=stock, price=10)
    ids = [p["id"] for p in products]
    assert len({product_partition(i) for i in ids}) == 3
    rng = random.Random(20261130)
    # Pairs routed to the partition of their smaller id, so the middle and the largest
    # product are changed from several partitions at once; singles on each partition.
    shapes = [(ids[0], ids[1]), (ids[1], ids[2]), (ids[0], ids[2]), (ids[0],), (ids[1],), (ids[2],)]
    requests_: list[tuple[int, list[tuple[int, int]]]] = []
    for n in range(300):
        shape = list(shapes[n % len(shapes)])
        if n % 2:
            shape.reverse()  # lines in descending order as often as ascending
        requests_.append((unique_id(), [(p, rng.randint(1, 3)) for p in shape]))
    rng.shuffle(requests_)

    job_ids = run_concurrently(lambda r: post_order(http, base, r[0], r[1]), requests_)
    jobs = settle(http, base, engine, job_ids)

    succeeded = [(r, j) for r, j in zip(requests_, jobs, strict=True) if j["status"] == "SUCCEEDED"]
    failed = [j for j in jobs if j["status"] == "FAILED"]
    assert len(succeeded) + len(failed) == 300
    assert succeeded, "no order succeeded"
    assert failed, "demand exceeds stock, so some orders must fail"
    assert {error_code(j) for j in failed} == {"INSUFFICIENT_STOCK"}
    # Routing: each job sits on the partition of its smallest product id.
    routed = dict(
        sql_rows(
            engine,
            "SELECT id::text, partition FROM jobs WHERE id = ANY(:ids)",
            ids=[uuid.UUID(j) for j in job_ids],
        )
    )
    for (_, lines), job_id in zip(requests_, job_ids, strict=True):
        assert routed[job_id] == product_partition(min(p for p, _ in lines))

    # Every successful order holds exactly the lines asked for; failed ones hold nothing.
    rows = sql_rows(
        engine,
        "SELECT o.job_id::text, o.user_id, l.product_id, l.quantity FROM orders o"
        " JOIN order_lines l ON l.order_id = o.id WHERE o.job_id = ANY(:ids)",
        ids=[uuid.UUID(j) for j in job_ids],
    )
    lines_of: dict[str, set[tuple[int, int]]] = {}
    for row in rows:
        lines_of.setdefault(row.job_id, set()).add((row.product_id, row.quantity))
    assert set(lines_of) == {j["jobId"] for _, j in succeeded}
    users_of = {row.job_id: row.user_id for row in rows}
    for (user, lines), job in succeeded:
        assert lines_of[job["jobId"]] == set(lines)
        assert users_of[job["jobId"]] == user

    # Stock delta per product == quantities taken by successful orders, via SQL and API.
    taken = Counter[int]()
    for (_, lines), _ in succeeded:
        for p, q in lines:
            taken[p] += q
    for p in ids:
        in_sql = sql_scalar(engine, "SELECT stock FROM products WHERE id = :p", p=p)
        via_api = get_json(http, f"{base}/v1/products/{p}")["stock"]
        assert in_sql == via_api == stock - taken[p], p
        assert in_sql >= 0
        assert (
            sql_scalar(
                engine,
                "SELECT coalesce(sum(quantity), 0) FROM order_lines WHERE product_id = :p",
                p=p,
            )
            == taken[p]
        )
    # Stock only falls here, so a failed order still finds a line its product cannot cover.
    final = {p: stock - taken[p] for p in ids}
    for (_, lines), job in zip(requests_, jobs, strict=True):
        if job["status"] == "FAILED":
            assert any(final[p] < q for p, q in lines), (lines, final)
    assert (
        sql_scalar(
            engine,
            "SELECT count(*) FROM jobs WHERE id = ANY(:ids) AND status = 'PENDING'",
            ids=[uuid.UUID(j) for j in job_ids],
        )
        == 0
    )
    # The orders read back through the API show both lines, in product order.
    for (_, lines), job in succeeded[:10]:
        order = get_json(http, f"{base}/v1/orders/{job['result']['orderId']}")
        assert [(x["productId"], x["quantity"]) for x in order["orderLines"]] == sorted(lines)
        assert order["totalPrice"] == sum(10 * q for _, q in lines)


def _order(http: requests.Session, base: str, user: int, product_id: int, quantity: int) -> int:
    job = wait_job(http, base, post_order(http, base, user, [(product_id, quantity)]))
    assert job["status"] == "SUCCEEDED", job
    order_id: int = job["result"]["orderId"]
    return order_id


def _put_status(
    http: requests.Session, base: str, order_id: int, status: str, if_match: str | None
) -> requests.Response:
    headers = dict(ADMIN)
    if if_match is not None:
        headers["If-Match"] = if_match
    return http.put(
        f"{base}/v1/orders/{order_id}/status",
        params={"status": status},
        headers=headers,
        timeout=30,
    )


def test_concurrent_status_changes_with_one_if_match_have_one_winner(
    stack: Stack, http: requests.Session, engine: Engine, unique_id: Callable[[], int]
) -> None:
    base = stack.base_url
    product = create_product(http, base, stock=10)
    order_id = _order(http, base, unique_id(), product["id"], 2)
    answer = http.get(f"{base}/v1/orders/{order_id}", timeout=30)
    assert answer.headers["ETag"] == '"1"'

    # Different targets, all allowed from READY, all claiming version 1.
    targets = ["PAYMENT_READY", "FAILED"] * 20
    answers = run_concurrently(lambda s: _put_status(http, base, order_id, s, '"1"'), targets, 40)
    codes = Counter(a.status_code for a in answers)
    assert codes == {200: 1, 409: 39}, codes
    assert all(
        a.json()["error"]["code"] == "ORDER_STATE_CONFLICT" for a in answers if a.status_code == 409
    )
    winner = next(a for a in answers if a.status_code == 200).json()
    assert winner["orderId"] == order_id
    assert winner["version"] == 2
    order = get_json(http, f"{base}/v1/orders/{order_id}")
    assert (order["status"], order["version"]) == (winner["status"], 2)
    assert sql_rows(engine, "SELECT status, version FROM orders WHERE id = :o", o=order_id) == [
        (winner["status"], 2)
    ]
    # The stock went back only if FAILED won, and then once.
    expected_stock = 10 if winner["status"] == "FAILED" else 8
    assert get_json(http, f"{base}/v1/products/{product['id']}")["stock"] == expected_stock
    assert sql_scalar(engine, "SELECT count(*) FROM outbox WHERE order_id = :o", o=order_id) == 2


def test_a_walk_through_the_states_has_one_winner_per_step(
    stack: Stack, http: requests.Session, engine: Engine, unique_id: Callable[[], int]
) -> None:
    base = stack.base_url
    product = create_product(http, base, stock=10)
    order_id = _order(http, base, unique_id(), product["id"], 4)
    # Each step: 30 identical requests with the current version (quoted or bare).
    for version, status in enumerate(["PAYMENT_READY", "COMPLETED"], start=1):
        if_match = f'"{version}"' if version % 2 else str(version)
        answers = run_concurrently(
            lambda _, s=status, m=if_match: _put_status(http, base, order_id, s, m), range(30), 30
        )
        assert Counter(a.status_code for a in answers) == {200: 1, 409: 29}
        winner = next(a for a in answers if a.status_code == 200)
        assert winner.json() == {"orderId": order_id, "status": status, "version": version + 1}
        assert winner.headers["ETag"] == f'"{version + 1}"'
    # COMPLETED is final, and version 2 is stale now.
    late = _put_status(http, base, order_id, "FAILED", "2")
    assert late.status_code == 409
    assert late.json()["error"]["code"] == "ORDER_STATE_CONFLICT"
    assert sql_rows(engine, "SELECT status, version FROM orders WHERE id = :o", o=order_id) == [
        ("COMPLETED", 3)
    ]
    assert get_json(http, f"{base}/v1/products/{product['id']}")["stock"] == 6
    assert sql_rows(
        engine, "SELECT status FROM outbox WHERE order_id = :o ORDER BY id", o=order_id
    ) == [("READY",), ("PAYMENT_READY",), ("COMPLETED",)]


def test_concurrent_failed_requests_restock_exactly_once(
    stack: Stack, http: requests.Session, engine: Engine, unique_id: Callable[[], int]
) -> None:
    base = stack.base_url
    products = create_products_on_distinct_partitions(http, base, 2, stock=50)
    a, b = products[0]["id"], products[1]["id"]
    job = wait_job(http, base, post_order(http, base, unique_id(), [(b, 7), (a, 5)]))
    assert job["status"] == "SUCCEEDED", job
    order_id = job["result"]["orderId"]
    other = _order(http, base, unique_id(), a, 3)  # an untouched order on the same product
    assert get_json(http, f"{base}/v1/products/{a}")["stock"] == 42

    # Half without If-Match, half with the current version: all want FAILED.
    variants: list[str | None] = [None, '"1"'] * 20
    answers = run_concurrently(
        lambda v: _put_status(http, base, order_id, "FAILED", v), variants, 40
    )
    assert Counter(x.status_code for x in answers) == {200: 1, 409: 39}
    winner: dict[str, Any] = next(x for x in answers if x.status_code == 200).json()
    assert winner == {"orderId": order_id, "status": "FAILED", "version": 2}

    # Restocked once: 50 - 5 - 3 + 5 = 47 and 50 - 7 + 7 = 50, in SQL and through the cache.
    assert get_json(http, f"{base}/v1/products/{a}")["stock"] == 47
    assert get_json(http, f"{base}/v1/products/{b}")["stock"] == 50
    stocks = dict(sql_rows(engine, "SELECT id, stock FROM products WHERE id IN (:a, :b)", a=a, b=b))
    assert stocks == {a: 47, b: 50}
    # FAILED is final: more FAILED requests change nothing.
    again = run_concurrently(lambda _: _put_status(http, base, order_id, "FAILED", None), range(10))
    assert {x.status_code for x in again} == {409}
    assert get_json(http, f"{base}/v1/products/{a}")["stock"] == 47
    assert get_json(http, f"{base}/v1/orders/{other}")["status"] == "READY"
    assert sql_rows(
        engine, "SELECT status FROM outbox WHERE order_id = :o ORDER BY id", o=order_id
    ) == [("READY",), ("FAILED",)]
