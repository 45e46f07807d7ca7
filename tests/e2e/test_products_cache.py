"""Product reads through the Redis cache-aside after jobs change the product.

API.md: once a job is SUCCEEDED, every read reflects it (cache included); listings
within 1 s.  Each read here is primed first, so a stale cache entry would be there
to be served if the refresh after commit were missing.
(The cache being down is covered by the fault tests, on their own Redis.)
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
import requests
from sqlalchemy import Engine

from tests.conftest import ADMIN, wait_job
from tests.e2e.helpers import (
    accepted,
    create_product,
    get_json,
    poll_until,
    post_order,
    run_concurrently,
    settle,
    sql_scalar,
)
from tests.stack import Stack

pytestmark = pytest.mark.e2e


def _set_stock(http: requests.Session, base: str, product_id: int, stock: int, n: int) -> str:
    url = f"{base}/v1/products/{product_id}/stock"
    if n % 2:
        answer = http.put(url, params={"stock": stock}, headers=ADMIN, timeout=30)
    else:
        answer = http.put(url, json={"stock": stock}, headers=ADMIN, timeout=30)
    return accepted(answer)


def _finished_by_polling(http: requests.Session, base: str, job_id: str) -> dict[str, Any]:
    """Plain GETs (no long poll): the first answer that is not PENDING."""

    def check() -> dict[str, Any] | None:
        body: dict[str, Any] = get_json(http, f"{base}/v1/jobs/{job_id}")
        return None if body["status"] == "PENDING" else body

    return poll_until(check, timeout=60, what=f"job {job_id}", interval=0.002)


def _listed(http: requests.Session, base: str, name: str) -> dict[str, Any]:
    page = get_json(http, f"{base}/v1/products", params={"name": name})
    assert page["total"] == 1, page
    item: dict[str, Any] = page["items"][0]
    return item


def _listing_shows(http: requests.Session, base: str, name: str, stock: int) -> None:
    """API.md: listings reflect a change within 1 s (polled up to that deadline)."""
    poll_until(
        lambda: True if _listed(http, base, name)["stock"] == stock else None,
        timeout=1.0,
        what=f"listing showing stock {stock}",
    )


def test_a_read_right_after_a_stock_set_shows_the_new_stock(
    stack: Stack, http: requests.Session, engine: Engine
) -> None:
    base = stack.base_url
    name = f"cache-{uuid.uuid4().hex}"
    product = create_product(http, base, stock=5, name=name)
    pid = product["id"]
    assert _listed(http, base, name)["stock"] == 5
    updated = product["updatedAt"]
    for n in range(20):
        value = 1000 + n if n % 2 == 0 else n  # alternating high and low, never repeated
        # Prime the single read and the listing with the current value.
        assert get_json(http, f"{base}/v1/products/{pid}")["stock"] != value
        assert _listed(http, base, name)["stock"] != value
        job_id = _set_stock(http, base, pid, value, n)
        # Half the time the long poll, half the time plain polling: the read comes right after.
        job = wait_job(http, base, job_id) if n % 2 else _finished_by_polling(http, base, job_id)
        read = get_json(http, f"{base}/v1/products/{pid}")
        assert job["status"] == "SUCCEEDED", job
        assert job["result"]["stock"] == value
        assert read["stock"] == value, (n, read)
        assert read == job["result"]
        assert read["updatedAt"] >= updated
        updated = read["updatedAt"]
        assert sql_scalar(engine, "SELECT stock FROM products WHERE id = :p", p=pid) == value
        _listing_shows(http, base, name, value)


def test_reads_are_exact_after_orders_and_a_restock(
    stack: Stack, http: requests.Session, engine: Engine, unique_id: Callable[[], int]
) -> None:
    base = stack.base_url
    name = f"cache-{uuid.uuid4().hex}"
    pid = create_product(http, base, stock=50, name=name, price=30)["id"]
    url = f"{base}/v1/products/{pid}"

    # Orders in three waves; each read primes the cache before the next wave.
    remaining = 50
    order_ids: list[int] = []
    for wave in (4, 7, 9):
        assert get_json(http, url)["stock"] == remaining
        job_ids = run_concurrently(
            lambda _: post_order(http, base, unique_id(), [(pid, 2)]), range(wave), workers=wave
        )
        jobs = settle(http, base, engine, job_ids)
        assert {j["status"] for j in jobs} == {"SUCCEEDED"}
        order_ids += [j["result"]["orderId"] for j in jobs]
        remaining -= 2 * wave
        assert get_json(http, url)["stock"] == remaining
        assert sql_scalar(engine, "SELECT stock FROM products WHERE id = :p", p=pid) == remaining
    assert remaining == 10

    # An order too big fails and changes nothing, the cache included.
    failed = wait_job(http, base, post_order(http, base, unique_id(), [(pid, 11)]))
    assert failed["error"]["code"] == "INSUFFICIENT_STOCK"
    assert get_json(http, url)["stock"] == 10

    # A cancelled order puts its stock back; the next read (and soon the listing) shows it.
    answer = http.put(
        f"{base}/v1/orders/{order_ids[0]}/status",
        params={"status": "FAILED"},
        headers=ADMIN,
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    assert get_json(http, url)["stock"] == 12
    _listing_shows(http, base, name, 12)

    # A stock set after orders: the order jobs' and the set's effects, in commit order.
    job_ids = [post_order(http, base, unique_id(), [(pid, 1)]) for _ in range(3)]
    job_ids.append(_set_stock(http, base, pid, 100, 0))
    job_ids += [post_order(http, base, unique_id(), [(pid, 5)]) for _ in range(2)]
    jobs = settle(http, base, engine, job_ids)
    assert [j["status"] for j in jobs] == ["SUCCEEDED"] * 6
    assert get_json(http, url)["stock"] == 90
    assert sql_scalar(engine, "SELECT stock FROM products WHERE id = :p", p=pid) == 90
