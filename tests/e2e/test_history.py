"""Order histories through the outbox and the history listener, on the real stack."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from sqlalchemy import Engine

from tests.conftest import ADMIN
from tests.e2e.helpers import (
    create_products_on_distinct_partitions,
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

# The moves applied after creation, by plan.
PLANS: dict[str, list[str]] = {
    "stay": [],
    "pay": ["PAYMENT_READY"],
    "complete": ["PAYMENT_READY", "COMPLETED"],
    "cancel": ["FAILED"],
    "pay-then-cancel": ["PAYMENT_READY", "FAILED"],
}


def _place_orders(
    http: requests.Session,
    base: str,
    engine: Engine,
    products: Sequence[int],
    users: Sequence[int],
) -> list[int]:
    """One single-unit order per user, concurrently; all must succeed."""
    rng = random.Random(len(users))
    lines = [[(rng.choice(products), 1)] for _ in users]
    job_ids = run_concurrently(
        lambda i: post_order(http, base, users[i], lines[i]), range(len(users))
    )
    jobs = settle(http, base, engine, job_ids)
    assert [j["status"] for j in jobs] == ["SUCCEEDED"] * len(users), [
        j for j in jobs if j["status"] != "SUCCEEDED"
    ][:3]
    return [int(j["result"]["orderId"]) for j in jobs]


def _apply_plans(http: requests.Session, base: str, plans: dict[int, list[str]]) -> None:
    """Each order walks its plan (in order); different orders concurrently."""

    def walk(item: tuple[int, list[str]]) -> None:
        order_id, moves = item
        for version, status in enumerate(moves, start=1):
            answer = http.put(
                f"{base}/v1/orders/{order_id}/status",
                params={"status": status},
                headers={**ADMIN, "If-Match": str(version)},
                timeout=30,
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["version"] == version + 1

    run_concurrently(walk, plans.items(), workers=32)


def _expected(plans: dict[int, list[str]]) -> dict[int, list[str]]:
    return {order_id: ["READY", *moves] for order_id, moves in plans.items()}


def _wait_histories(
    http: requests.Session, base: str, engine: Engine, expected: dict[int, list[str]]
) -> None:
    """Every order's history, via SQL then the API, is exactly its states in order."""
    order_ids = list(expected)
    total = sum(len(v) for v in expected.values())

    def all_delivered() -> bool | None:
        count = sql_scalar(
            engine, "SELECT count(*) FROM order_histories WHERE order_id = ANY(:ids)", ids=order_ids
        )
        assert count <= total, "more history rows than states entered"
        return True if count == total else None

    poll_until(all_delivered, timeout=60, what=f"{total} history rows")
    rows = sql_rows(
        engine,
        "SELECT order_id, status FROM order_histories WHERE order_id = ANY(:ids)"
        " ORDER BY order_id, created_at, id",
        ids=order_ids,
    )
    in_sql: dict[int, list[str]] = {}
    for row in rows:
        in_sql.setdefault(row.order_id, []).append(row.status)
    assert in_sql == expected

    def read(order_id: int) -> tuple[int, list[str], list[str]]:
        items = get_json(http, f"{base}/v1/orders/{order_id}/histories")["items"]
        stamps = [item["createdAt"] for item in items]
        return order_id, [item["status"] for item in items], stamps

    for order_id, statuses, stamps in run_concurrently(read, order_ids, workers=16):
        assert statuses == expected[order_id], order_id
        assert stamps == sorted(stamps), order_id
    # Every outbox row of these orders was delivered, once.
    assert (
        sql_scalar(
            engine,
            "SELECT count(*) FROM outbox WHERE order_id = ANY(:ids) AND delivered_at IS NOT NULL",
            ids=order_ids,
        )
        == total
    )


def _plan_for(order_ids: Sequence[int], seed: int) -> dict[int, list[str]]:
    rng = random.Random(seed)
    names = list(PLANS)
    return {order_id: PLANS[rng.choice(names)] for order_id in order_ids}


def test_every_state_entered_has_one_history_row_in_order(
    stack: Stack, http: requests.Session, engine: Engine, unique_id: Callable[[], int]
) -> None:
    base = stack.base_url
    products = [p["id"] for p in create_products_on_distinct_partitions(http, base, 3, stock=1000)]
    users = [unique_id() for _ in range(200)]
    order_ids = _place_orders(http, base, engine, products, users)
    assert len(set(order_ids)) == 200
    plans = _plan_for(order_ids, seed=1)
    assert {tuple(m) for m in plans.values()} == {tuple(m) for m in PLANS.values()}
    _apply_plans(http, base, plans)
    _wait_histories(http, base, engine, _expected(plans))
    # The order itself agrees with its last history row.
    for order_id, moves in list(plans.items())[:20]:
        order = get_json(http, f"{base}/v1/orders/{order_id}")
        assert order["status"] == (moves[-1] if moves else "READY")
        assert order["version"] == 1 + len(moves)


def test_history_of_an_unknown_order_is_404(stack: Stack, http: requests.Session) -> None:
    answer = http.get(f"{stack.base_url}/v1/orders/{2**62}/histories", timeout=30)
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "NOT_FOUND"


def test_a_listener_killed_mid_stream_loses_and_doubles_nothing(
    stack: Stack, http: requests.Session, engine: Engine, unique_id: Callable[[], int]
) -> None:
    base = stack.base_url
    products = [p["id"] for p in create_products_on_distinct_partitions(http, base, 2, stock=1000)]
    before = _place_orders(http, base, engine, products, [unique_id() for _ in range(60)])
    plans_before = _plan_for(before, seed=2)

    # The stream keeps going in the background while the listener is killed.
    results: dict[str, Any] = {}
    with ThreadPoolExecutor(max_workers=1) as background:
        moving = background.submit(_apply_plans, http, base, plans_before)
        try:
            # Killed (SIGKILL) once it is delivering the moves of this stream.
            delivered_at_kill = poll_until(
                lambda: (
                    sql_scalar(
                        engine,
                        "SELECT count(*) FROM order_histories WHERE order_id = ANY(:ids)"
                        " AND status <> 'READY'",
                        ids=before,
                    )
                    or None
                ),
                timeout=60,
                what="the listener delivering the stream",
                interval=0.01,
            )
            stack.kill("history")
            print(
                f"\nhistory listener killed after {delivered_at_kill} of"
                f" {sum(len(m) for m in plans_before.values())} moves delivered"
            )
            moving.result(timeout=120)
            during = _place_orders(http, base, engine, products, [unique_id() for _ in range(60)])
            plans_during = _plan_for(during, seed=3)
            _apply_plans(http, base, plans_during)
            # Nothing delivers while the listener is down: these rows wait in the outbox.
            results["waiting"] = sql_scalar(
                engine,
                "SELECT count(*) FROM outbox WHERE order_id = ANY(:ids) AND delivered_at IS NULL",
                ids=during,
            )
        finally:
            stack.start("history")
    assert results["waiting"] == sum(1 + len(m) for m in plans_during.values())

    after = _place_orders(http, base, engine, products, [unique_id() for _ in range(20)])
    plans_after = _plan_for(after, seed=4)
    _apply_plans(http, base, plans_after)

    expected = _expected({**plans_before, **plans_during, **plans_after})
    _wait_histories(http, base, engine, expected)
    duplicates = sql_rows(
        engine,
        "SELECT order_id, status FROM order_histories WHERE order_id = ANY(:ids)"
        " GROUP BY order_id, status HAVING count(*) > 1",
        ids=list(expected),
    )
    assert duplicates == []
