"""Points over HTTP against real gunicorn, Celery worker and Redis."""

from __future__ import annotations

import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import Engine, text

from tests.conftest import wait_job
from tests.e2e.helpers import both_auth_modes
from tests.stack import Stack

pytestmark = pytest.mark.e2e


@both_auth_modes
def test_charge_then_read_the_balance(
    stack: Stack, http: requests.Session, unique_id: Callable[[], int]
) -> None:
    user = unique_id()
    answer = http.post(f"{stack.base_url}/v1/points/charge", json={"userId": user, "amount": 500})
    assert answer.status_code == 202
    assert answer.headers["Location"] == f"/v1/jobs/{answer.json()['jobId']}"
    job = wait_job(http, stack.base_url, answer.json()["jobId"])
    assert job["status"] == "SUCCEEDED"
    assert job["result"] == {"userId": user, "amount": 500}
    assert http.get(f"{stack.base_url}/v1/points/{user}").json() == {"userId": user, "amount": 500}


@both_auth_modes
def test_200_concurrent_charges_and_uses_on_one_user_add_up(
    stack: Stack, http: requests.Session, engine: Engine, unique_id: Callable[[], int]
) -> None:
    user = unique_id()
    rng = random.Random(7)
    requests_ = [
        ("charge" if rng.random() < 0.5 else "use", rng.randint(1, 1000)) for _ in range(200)
    ]

    def send(item: tuple[str, int]) -> tuple[str, int, str]:
        kind, amount = item
        answer = http.post(
            f"{stack.base_url}/v1/points/{kind}",
            json={"userId": user, "amount": amount},
            timeout=30,
        )
        assert answer.status_code == 202, answer.text
        return kind, amount, answer.json()["jobId"]

    with ThreadPoolExecutor(max_workers=50) as pool:
        accepted = list(pool.map(send, requests_))
        outcomes = list(
            pool.map(lambda a: (a[0], a[1], wait_job(http, stack.base_url, a[2])), accepted)
        )

    succeeded = [(kind, amount) for kind, amount, job in outcomes if job["status"] == "SUCCEEDED"]
    failed = [job for _, _, job in outcomes if job["status"] == "FAILED"]
    assert all(job["error"]["code"] == "INSUFFICIENT_POINTS" for job in failed)
    assert any(kind == "use" for kind, _ in succeeded)
    expected = sum(a for k, a in succeeded if k == "charge") - sum(
        a for k, a in succeeded if k == "use"
    )

    balance = http.get(f"{stack.base_url}/v1/points/{user}").json()["amount"]
    assert balance == expected
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT count(*), min(balance_after) FROM point_histories WHERE user_id = :u"),
            {"u": user},
        ).one()
    assert rows[0] == len(succeeded)
    assert rows[1] >= 0
    # Every job result saw a non-negative balance, and the last one applied is the final balance.
    assert all(
        job["result"]["amount"] >= 0 for _, _, job in outcomes if job["status"] == "SUCCEEDED"
    )


def test_a_job_published_twice_changes_the_balance_once(
    stack: Stack, http: requests.Session, unique_id: Callable[[], int]
) -> None:
    from celery import Celery

    user = unique_id()
    answer = http.post(
        f"{stack.base_url}/v1/points/charge", json={"userId": user, "amount": 700}
    ).json()
    job = wait_job(http, stack.base_url, answer["jobId"])
    assert job["status"] == "SUCCEEDED"
    # Redeliver: send the partition's wake-up again, twice, as a broker or sweeper might.
    client = Celery(broker=stack.redis_url, set_as_current=False)
    from shared.jobs import DRAIN_TASK, PARTITION_KIND_OF, JobKind
    from shared.partitions import partition

    queue = partition(PARTITION_KIND_OF[JobKind.POINTS_CHARGE], user, 16)
    for _ in range(2):
        client.send_task(DRAIN_TASK, args=[queue], queue=queue)
    # A later job on the same partition finishes only after those wake-ups were consumed.
    later = http.post(
        f"{stack.base_url}/v1/points/charge", json={"userId": user, "amount": 1}
    ).json()
    assert wait_job(http, stack.base_url, later["jobId"])["status"] == "SUCCEEDED"
    assert http.get(f"{stack.base_url}/v1/points/{user}").json()["amount"] == 701
