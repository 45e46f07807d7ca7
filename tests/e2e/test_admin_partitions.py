"""GET /v1/admin/partitions on the real stack: a drain is recorded, a backlog is counted."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import requests

from shared.partitions import PartitionKind, partition
from tests.conftest import ADMIN, wait_job
from tests.e2e.helpers import PARTITIONS
from tests.stack import Stack

pytestmark = pytest.mark.e2e


def partitions(http: requests.Session, stack: Stack) -> dict[str, dict[str, Any]]:
    answer = http.get(f"{stack.base_url}/v1/admin/partitions", headers=ADMIN, timeout=10)
    assert answer.status_code == 200, answer.text
    return {item["queue"]: item for item in answer.json()["items"]}


def test_the_drain_of_a_job_is_recorded_for_its_partition(
    stack: Stack, http: requests.Session, unique_id: Callable[[], int]
) -> None:
    user = unique_id()
    queue = partition(PartitionKind.USER, user, PARTITIONS)
    assert len(partitions(http, stack)) == 3 * PARTITIONS
    accepted = http.post(
        f"{stack.base_url}/v1/points/charge", json={"userId": user, "amount": 7}, timeout=10
    )
    assert accepted.status_code == 202
    job = wait_job(http, stack.base_url, accepted.json()["jobId"])
    assert job["status"] == "SUCCEEDED"
    # The note is written just after the commit that finished the job: poll briefly.
    deadline = time.monotonic() + 10
    while (partitions(http, stack)[queue]["lastDrainAt"] or "") < job["finishedAt"]:
        assert time.monotonic() < deadline, partitions(http, stack)[queue]
        time.sleep(0.05)
    assert partitions(http, stack)[queue]["kind"] == "user"
