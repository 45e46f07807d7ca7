"""One scrape of web's /metrics on the real stack: gunicorn's 2 workers and the
partition worker, added up through prometheus_client's multiprocess folder.

The stack's counters are cumulative over the session, so the test compares one
scrape after its jobs with one before; no other test sends jobs meanwhile.
"""

from __future__ import annotations

import json
import random
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine

from shared.partitions import PartitionKind, all_partition_queues, partition
from tests.e2e.helpers import PARTITIONS, poll_until, run_concurrently, sql_rows, wait_jobs_settled
from tests.stack import Stack

pytestmark = pytest.mark.e2e

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(stack: Stack) -> Samples:
    answer = requests.get(f"{stack.base_url}/metrics", timeout=30)
    assert answer.status_code == 200, answer.text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and wanted <= lab)


def accepted_per_process(folder: Path) -> dict[int, float]:
    """``shop_jobs_accepted_total`` as each process wrote it (its own file, by pid)."""
    per_pid: dict[int, float] = {}
    for path in folder.glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(str(path)):
            if json.loads(key)[1] == "shop_jobs_accepted_total":
                per_pid[pid] = per_pid.get(pid, 0.0) + value
    return per_pid


def test_one_scrape_sums_every_web_process_and_the_workers_outcomes(
    stack: Stack, engine: Engine, unique_id: Callable[[], int]
) -> None:
    users = [unique_id() for _ in range(4)]
    rng = random.Random(11)
    # Charges and uses in a race on 4 users: some uses find too few points (FAILED).
    todo = [
        (rng.choice(("charge", "use")), rng.choice(users), rng.randint(1, 500)) for _ in range(240)
    ]
    before = scrape(stack)
    by_pid_before = accepted_per_process(stack.metrics_dir)

    def send(item: tuple[str, int, int]) -> str:
        verb, user, amount = item
        # A connection of its own per job: the kernel hands them to both gunicorn workers.
        answer = requests.post(
            f"{stack.base_url}/v1/points/{verb}",
            json={"userId": user, "amount": amount},
            timeout=30,
        )
        assert answer.status_code == 202, answer.text
        job_id: str = answer.json()["jobId"]
        return job_id

    job_ids = run_concurrently(send, todo, workers=32)
    sent = Counter("POINTS_CHARGE" if verb == "charge" else "POINTS_USE" for verb, _, _ in todo)

    after = scrape(stack)  # once, right after the last 202
    for kind, n in sent.items():
        got = total(after, "shop_jobs_accepted_total", kind=kind)
        assert got - total(before, "shop_jobs_accepted_total", kind=kind) == n, kind
    requests_202 = total(after, "http_requests_total", method="POST", status="202") - total(
        before, "http_requests_total", method="POST", status="202"
    )
    assert requests_202 == len(todo)
    by_pid = accepted_per_process(stack.metrics_dir)
    served = {pid: n - by_pid_before.get(pid, 0) for pid, n in by_pid.items()}
    served = {pid: n for pid, n in served.items() if n}
    assert sum(served.values()) == len(todo)
    assert len(served) == 2, f"both gunicorn workers should have accepted jobs: {served}"

    # What the jobs' outcomes are, by the database, and what the workers counted.
    wait_jobs_settled(engine, job_ids)
    rows = sql_rows(
        engine,
        "SELECT kind, status, coalesce(error->>'code', ''), count(*) FROM jobs"
        " WHERE id = ANY(:ids) GROUP BY 1, 2, 3",
        ids=[uuid.UUID(j) for j in job_ids],
    )
    outcomes = {(kind, status, code): n for kind, status, code, n in rows}
    assert {status for _, status, _ in outcomes} == {"SUCCEEDED", "FAILED"}, outcomes

    def counted() -> Samples | None:
        # Counted just after the commit the database shows: poll briefly for the last ones.
        samples = scrape(stack)
        done = total(samples, "shop_jobs_finished_total") - total(
            before, "shop_jobs_finished_total"
        )
        return samples if done >= len(todo) else None

    finished = poll_until(counted, 30, "finished jobs counted", interval=0.2)
    for (kind, status, code), n in outcomes.items():
        labels = {"kind": kind, "status": status, "code": code}
        got = total(finished, "shop_jobs_finished_total", **labels)
        assert got - total(before, "shop_jobs_finished_total", **labels) == n, labels
    assert total(finished, "shop_jobs_finished_total") - total(
        before, "shop_jobs_finished_total"
    ) == len(todo)
    waited = total(finished, "shop_job_seconds_count") - total(before, "shop_job_seconds_count")
    assert waited == len(todo)
    drains = total(finished, "shop_drains_total", kind="user") - total(
        before, "shop_drains_total", kind="user"
    )
    batched = total(finished, "shop_drain_batch_jobs_sum", kind="user") - total(
        before, "shop_drain_batch_jobs_sum", kind="user"
    )
    assert drains >= 1
    assert batched == len(todo)

    # The backlog of every partition, read at scrape time: the test's are empty now.
    pending = {
        dict(labels)["queue"]: v
        for (name, labels), v in finished.items()
        if name == "shop_partition_pending_jobs"
    }
    assert set(pending) == set(all_partition_queues(PARTITIONS))
    for user in users:
        assert pending[partition(PartitionKind.USER, user, PARTITIONS)] == 0
