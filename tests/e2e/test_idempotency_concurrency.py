"""Concurrent requests with one Idempotency-Key create one job, over real gunicorn."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import Engine, func, select

from shared.models import Job, PointBalance
from tests.conftest import wait_job
from tests.stack import Stack

pytestmark = pytest.mark.e2e


def test_fifty_concurrent_posts_with_one_key_make_one_job(
    stack: Stack, http: requests.Session, engine: Engine, unique_id: Callable[[], int]
) -> None:
    user = unique_id()
    key = f"charge-{uuid.uuid4()}"

    def post(_: int) -> requests.Response:
        return http.post(
            f"{stack.base_url}/v1/points/charge",
            json={"userId": user, "amount": 300},
            headers={"Idempotency-Key": key},
            timeout=30,
        )

    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(post, range(50)))

    assert {a.status_code for a in answers} == {202}
    job_ids = {a.json()["jobId"] for a in answers}
    assert len(job_ids) == 1
    assert wait_job(http, stack.base_url, job_ids.pop())["status"] == "SUCCEEDED"
    with engine.connect() as conn:
        jobs = conn.execute(
            select(func.count()).select_from(Job).where(Job.payload["userId"].astext == str(user))
        ).scalar_one()
        balance = conn.execute(
            select(PointBalance.balance).where(PointBalance.user_id == user)
        ).scalar_one()
    assert (jobs, balance) == (1, 300)

    reused = http.post(
        f"{stack.base_url}/v1/points/charge",
        json={"userId": user, "amount": 301},
        headers={"Idempotency-Key": key},
        timeout=30,
    )
    assert reused.status_code == 422
    assert reused.json()["error"]["code"] == "IDEMPOTENCY_KEY_REUSED"
