"""Coupon issues over HTTP against the real stack: never past the quantity, once per user."""

from __future__ import annotations

import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable

import pytest
import requests
from sqlalchemy import Engine

from tests.e2e.helpers import (
    accepted,
    both_auth_modes,
    coupon_partition,
    create_coupon,
    error_code,
    get_json,
    run_concurrently,
    settle,
    sql_rows,
    sql_scalar,
    wait_jobs_settled,
)
from tests.stack import Stack

pytestmark = pytest.mark.e2e


def _issue(
    http: requests.Session, base: str, coupon_id: int, user_id: int, *, in_query: bool
) -> str:
    url = f"{base}/v1/coupons/{coupon_id}/issue"
    if in_query:
        return accepted(http.post(url, params={"userId": user_id}, timeout=60))
    return accepted(http.post(url, json={"userId": user_id}, timeout=60))


@both_auth_modes
def test_600_concurrent_issues_by_300_users_give_exactly_50(
    stack: Stack, http: requests.Session, engine: Engine, unique_id: Callable[[], int]
) -> None:
    base = stack.base_url
    coupon = create_coupon(http, base, total=50)
    cid = coupon["id"]
    assert (coupon["issuedQuantity"], coupon["remaining"]) == (0, 50)
    users = [unique_id() for _ in range(300)]
    calls = [(u, True) for u in users] + [(u, False) for u in users]
    random.Random(50).shuffle(calls)

    job_ids = run_concurrently(lambda c: _issue(http, base, cid, c[0], in_query=c[1]), calls)
    jobs = settle(http, base, engine, job_ids)

    outcomes: dict[int, list[str]] = {}
    for (user, _), job in zip(calls, jobs, strict=True):
        assert job["kind"] == "COUPON_ISSUE"
        outcomes.setdefault(user, []).append(error_code(job) or job["status"])
        if job["status"] == "SUCCEEDED":
            assert job["result"]["couponId"] == cid
            assert job["result"]["userId"] == user
    holders = {u for u, seen in outcomes.items() if "SUCCEEDED" in seen}
    assert len(holders) == 50
    # A holder won once and was then told it already holds it; everyone else: sold out twice.
    for user, seen in outcomes.items():
        if user in holders:
            assert sorted(seen) == ["COUPON_ALREADY_ISSUED", "SUCCEEDED"], (user, seen)
        else:
            assert seen == ["COUPON_SOLD_OUT", "COUPON_SOLD_OUT"], (user, seen)
    assert Counter(error_code(j) or j["status"] for j in jobs) == {
        "SUCCEEDED": 50,
        "COUPON_ALREADY_ISSUED": 50,
        "COUPON_SOLD_OUT": 500,
    }

    # SQL: 50 rows, 50 distinct users, the counter agrees.
    rows = sql_rows(engine, "SELECT user_id, id FROM user_coupons WHERE coupon_id = :c", c=cid)
    assert len(rows) == 50
    assert {r.user_id for r in rows} == holders
    assert sql_scalar(engine, "SELECT issued_quantity FROM coupons WHERE id = :c", c=cid) == 50
    assert {j["result"]["userCouponId"] for j in jobs if j["status"] == "SUCCEEDED"} == {
        r.id for r in rows
    }
    # API: the coupon is used up, each holder sees it once, a loser sees nothing.
    view = get_json(http, f"{base}/v1/coupons/{cid}")
    assert (view["issuedQuantity"], view["remaining"], view["totalQuantity"]) == (50, 0, 50)

    def coupons_of(user: int) -> list[int]:
        items = get_json(http, f"{base}/v1/users/{user}/coupons")["items"]
        return [item["couponId"] for item in items]

    for user in holders:
        assert coupons_of(user) == [cid]
    assert coupons_of(next(u for u in users if u not in holders)) == []
    partitions = sql_rows(
        engine,
        "SELECT DISTINCT partition FROM jobs WHERE id = ANY(:ids)",
        ids=[uuid.UUID(j) for j in job_ids],
    )
    assert [p[0] for p in partitions] == [coupon_partition(cid)]


@both_auth_modes
def test_first_come_first_served_for_sequential_requests(
    stack: Stack, http: requests.Session, engine: Engine, unique_id: Callable[[], int]
) -> None:
    base = stack.base_url
    cid = create_coupon(http, base, total=50)["id"]
    users = [unique_id() for _ in range(80)]
    # One client, one request after the other (each answered before the next is sent).
    job_ids = [_issue(http, base, cid, u, in_query=n % 2 == 0) for n, u in enumerate(users)]
    jobs = settle(http, base, engine, job_ids)

    assert [j["status"] for j in jobs] == ["SUCCEEDED"] * 50 + ["FAILED"] * 30
    assert {error_code(j) for j in jobs[50:]} == {"COUPON_SOLD_OUT"}
    holders = sql_rows(
        engine, "SELECT user_id FROM user_coupons WHERE coupon_id = :c ORDER BY id", c=cid
    )
    assert [h.user_id for h in holders] == users[:50]
    ids = [j["result"]["userCouponId"] for j in jobs[:50]]
    assert ids == sorted(ids)
    assert get_json(http, f"{base}/v1/coupons/{cid}")["remaining"] == 0


def _time_issues(
    stack: Stack,
    http: requests.Session,
    engine: Engine,
    batches: list[tuple[int, list[int]]],
) -> tuple[float, float, float]:
    """Queue every issue while the partition worker is stopped, then start it.

    Returns (seconds to accept them all, seconds from the worker's start until
    all were applied, seconds from the first job applied to the last).
    """
    base = stack.base_url
    calls = [(cid, u) for cid, users in batches for u in users]
    random.Random(1).shuffle(calls)
    stack.kill("worker", signal.SIGTERM)
    try:
        started = time.monotonic()
        job_ids = run_concurrently(lambda c: _issue(http, base, c[0], c[1], in_query=True), calls)
        accepting = time.monotonic() - started
        ids = [uuid.UUID(j) for j in job_ids]
        assert sql_scalar(
            engine, "SELECT count(*) FROM jobs WHERE id = ANY(:ids) AND status = 'PENDING'", ids=ids
        ) == len(calls)
    finally:
        stack.start("worker")
    started = time.monotonic()
    wait_jobs_settled(engine, job_ids, timeout=180)
    draining = time.monotonic() - started
    span = sql_scalar(
        engine,
        "SELECT extract(epoch FROM max(finished_at) - min(finished_at)) FROM jobs"
        " WHERE id = ANY(:ids)",
        ids=ids,
    )
    statuses = sql_rows(
        engine, "SELECT status, count(*) FROM jobs WHERE id = ANY(:ids) GROUP BY status", ids=ids
    )
    assert dict(statuses) == {"SUCCEEDED": len(calls)}
    for cid, users in batches:
        issued = sql_scalar(engine, "SELECT issued_quantity FROM coupons WHERE id = :c", c=cid)
        assert issued == len(users)
    return accepting, draining, float(span)


def test_measure_one_hot_coupon_against_two_on_different_partitions(
    stack: Stack, http: requests.Session, engine: Engine, unique_id: Callable[[], int]
) -> None:
    """A measurement, not a speed assertion: printed (pytest -s) for the report."""
    base = stack.base_url
    n = 1000
    one = create_coupon(http, base, total=n)["id"]
    two: list[int] = []
    while len(two) < 2:
        cid = create_coupon(http, base, total=n)["id"]
        if not two or coupon_partition(cid) != coupon_partition(two[0]):
            two.append(cid)
    assert coupon_partition(two[0]) != coupon_partition(two[1])

    single = _time_issues(stack, http, engine, [(one, [unique_id() for _ in range(n)])])
    double = _time_issues(
        stack, http, engine, [(cid, [unique_id() for _ in range(n)]) for cid in two]
    )
    for label, count, (accepting, draining, span) in (
        (f"1 x {n} on one coupon", n, single),
        (f"2 x {n} on two coupon partitions", 2 * n, double),
    ):
        print(
            f"\ncoupon issues, {label}: accepted in {accepting:.2f}s ({count / accepting:.0f}/s);"
            f" worker start to all applied {draining:.2f}s;"
            f" first to last applied {span:.2f}s ({count / span:.0f}/s)"
        )
