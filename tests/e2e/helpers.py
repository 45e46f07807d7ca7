"""Shared steps of the e2e tests: create resources, send jobs concurrently, wait for them.

Waiting for many jobs does not hold one long poll per job (that would park every
gunicorn thread): the jobs table is polled with a deadline until none of them is
PENDING, then each job is read once through the API.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
import requests
from sqlalchemy import Engine, text

from shared.partitions import PartitionKind, partition
from tests.conftest import ADMIN, AUTH_MODES

# A test so marked runs against AUTH_MODE=none and AUTH_MODE=jwt (its requests then carry
# the token of the user they name: tests.tokens.UserTokens).
both_auth_modes = pytest.mark.parametrize("stack", AUTH_MODES, indirect=True)

# The stack runs with the default PARTITIONS (tests.stack sets no other).
PARTITIONS = 16
POOL = 64

T = TypeVar("T")
R = TypeVar("R")


def run_concurrently(fn: Callable[[T], R], items: Iterable[T], workers: int = POOL) -> list[R]:
    """``fn`` over ``items`` on a thread pool; results in the order of ``items``."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


def create_product(
    http: requests.Session, base_url: str, *, stock: int, price: int = 100, name: str = ""
) -> dict[str, Any]:
    answer = http.post(
        f"{base_url}/v1/products",
        json={"name": name or f"e2e-{uuid.uuid4().hex[:12]}", "price": price, "stock": stock},
        headers=ADMIN,
        timeout=30,
    )
    assert answer.status_code == 201, answer.text
    product: dict[str, Any] = answer.json()
    return product


def product_partition(product_id: int) -> str:
    return partition(PartitionKind.PRODUCT, product_id, PARTITIONS)


def coupon_partition(coupon_id: int) -> str:
    return partition(PartitionKind.COUPON, coupon_id, PARTITIONS)


def create_products_on_distinct_partitions(
    http: requests.Session, base_url: str, count: int, *, stock: int, price: int = 100
) -> list[dict[str, Any]]:
    """``count`` new products, ascending ids, no two on the same product partition."""
    chosen: list[dict[str, Any]] = []
    seen: set[str] = set()
    for _ in range(count * 20):
        product = create_product(http, base_url, stock=stock, price=price)
        if product_partition(product["id"]) not in seen:
            seen.add(product_partition(product["id"]))
            chosen.append(product)
            if len(chosen) == count:
                return chosen
    pytest.fail(f"could not find {count} products on distinct partitions")


def create_coupon(
    http: requests.Session, base_url: str, *, total: int, discount: int = 1000
) -> dict[str, Any]:
    answer = http.post(
        f"{base_url}/v1/coupons",
        json={
            "name": f"e2e-{uuid.uuid4().hex[:12]}",
            "discountAmount": discount,
            "totalQuantity": total,
        },
        headers=ADMIN,
        timeout=30,
    )
    assert answer.status_code == 201, answer.text
    coupon: dict[str, Any] = answer.json()
    return coupon


def accepted(answer: requests.Response) -> str:
    """The job id of a 202 answer (fails the test on anything else)."""
    assert answer.status_code == 202, f"{answer.status_code} {answer.text}"
    body = answer.json()
    assert body["status"] == "PENDING"
    assert answer.headers["Location"] == f"/v1/jobs/{body['jobId']}"
    job_id: str = body["jobId"]
    return job_id


def post_order(
    http: requests.Session, base_url: str, user_id: int, lines: Sequence[tuple[int, int]]
) -> str:
    answer = http.post(
        f"{base_url}/v1/orders",
        json={
            "userId": user_id,
            "orderLines": [{"productId": p, "quantity": q} for p, q in lines],
        },
        timeout=60,
    )
    return accepted(answer)


def wait_jobs_settled(engine: Engine, job_ids: Sequence[str], timeout: float = 120) -> None:
    """Poll the jobs table until none of ``job_ids`` is PENDING (fails past ``timeout``)."""
    ids = [uuid.UUID(j) for j in job_ids]
    deadline = time.monotonic() + timeout
    pending = len(ids)
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            pending = conn.execute(
                text("SELECT count(*) FROM jobs WHERE id = ANY(:ids) AND status = 'PENDING'"),
                {"ids": ids},
            ).scalar_one()
        if pending == 0:
            return
        time.sleep(0.1)
    pytest.fail(f"{pending} of {len(ids)} jobs still PENDING after {timeout}s")


def read_jobs(
    http: requests.Session, base_url: str, job_ids: Sequence[str]
) -> list[dict[str, Any]]:
    """Each job as GET /v1/jobs/{id} shows it, in the order of ``job_ids``."""

    def read(job_id: str) -> dict[str, Any]:
        answer = http.get(f"{base_url}/v1/jobs/{job_id}", timeout=30)
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        assert body["jobId"] == job_id
        return body

    return run_concurrently(read, job_ids, workers=16)


def settle(
    http: requests.Session,
    base_url: str,
    engine: Engine,
    job_ids: Sequence[str],
    timeout: float = 120,
) -> list[dict[str, Any]]:
    """Wait until every job finished, then read them all through the API."""
    wait_jobs_settled(engine, job_ids, timeout)
    jobs = read_jobs(http, base_url, job_ids)
    assert [j["status"] for j in jobs if j["status"] == "PENDING"] == []
    return jobs


def error_code(job: dict[str, Any]) -> str | None:
    error = job.get("error")
    return None if error is None else str(error["code"])


def get_json(http: requests.Session, url: str, **kwargs: Any) -> Any:
    answer = http.get(url, timeout=30, **kwargs)
    assert answer.status_code == 200, f"{url}: {answer.status_code} {answer.text}"
    return answer.json()


def sql_scalar(engine: Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(text(sql), params).scalar_one()


def sql_rows(engine: Engine, sql: str, **params: Any) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(text(sql), params).all())


def poll_until(
    check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05
) -> T:
    """Call ``check`` until it returns something other than None (fails past ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"{what}: not within {timeout}s")
        time.sleep(interval)
