"""Scaling the partition workers 1 -> 3 -> 2 while a stream of jobs flows on hot resources.

A few hot resources (3 products on distinct partitions taking ``STOCK_SET`` with
ever larger values, 3 users on distinct partitions taking point charges) each get
a client of their own that sends its jobs one after another, so each resource's
order of acceptance is the order of its 202s.  The stack starts with one worker;
two more join (``WORKER_ID`` 1 and 2, so three distinct node names); one of the
three is SIGKILLed while it drains; the stream goes on with the other two.

Then, exactly: every 202 is applied once (lost 0, doubled 0), and per resource the
order of application equals the order of acceptance: the jobs ordered by
(finishedAt, seq) (finishedAt is per batch, a batch applies in seq order), the
point histories in insertion order, the last stock equal to the last STOCK_SET
accepted.  The jobs accepted up to a second after the kill are all applied within
a deadline (the sweeper, SWEEP_AFTER_SECONDS=3 here, re-sends the wake-ups the killed
worker held); the report gives the measured time.
Each worker serves its own metrics on METRICS_PORT + WORKER_ID: the two that joined
must have drained partitions.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from shared.config import REDIS_DB_BROKER, redis_url_for
from shared.embedded import free_port
from shared.partitions import PartitionKind, partition
from tests.faults.harness import (
    ADMIN,
    Report,
    Rig,
    drains_of,
    private_rig,
    wait_settled,
    wait_until,
)

pytestmark = pytest.mark.faults

PARTITIONS = 16  # the stack's default
RATE_PER_RESOURCE = 10.0  # jobs per second each hot resource's client sends
RECOVERY_DEADLINE = 30.0  # the sweeper needs ~SWEEP_AFTER_SECONDS + SWEEP_INTERVAL_SECONDS


@dataclass
class Resource:
    """One hot resource and the jobs its client got a 202 for, in that order."""

    kind: str  # "product" or "user"
    id: int
    accepted: list[tuple[str, int]] = field(default_factory=list)  # (job id, value)
    refused: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def request(self, base_url: str, http: requests.Session, n: int) -> requests.Response:
        key = {"Idempotency-Key": f"scale-{self.kind}-{self.id}-{n}"}
        if self.kind == "product":
            return http.put(
                f"{base_url}/v1/products/{self.id}/stock",
                json={"stock": 1000 + n},
                headers={**ADMIN, **key},
                timeout=30,
            )
        return http.post(
            f"{base_url}/v1/points/charge",
            json={"userId": self.id, "amount": n + 1},
            headers=key,
            timeout=30,
        )

    def value(self, n: int) -> int:
        return 1000 + n if self.kind == "product" else n + 1

    def job_ids(self) -> list[str]:
        with self.lock:
            return [job_id for job_id, _ in self.accepted]


class Stream:
    """A client per resource sending its jobs one after another (paced) until stopped."""

    def __init__(self, base_url: str, resources: list[Resource]) -> None:
        self._base_url = base_url
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(r,), daemon=True) for r in resources
        ]
        self.resources = resources
        for thread in self._threads:
            thread.start()

    def _run(self, resource: Resource) -> None:
        started = time.monotonic()
        with requests.Session() as http:
            n = 0
            while not self._stop.is_set():
                delay = started + n / RATE_PER_RESOURCE - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)  # pacing
                try:
                    answer = resource.request(self._base_url, http, n)
                except requests.RequestException as exc:
                    with resource.lock:
                        resource.refused.append(f"no answer: {exc}")
                    n += 1
                    continue
                with resource.lock:
                    if answer.status_code == 202:
                        resource.accepted.append((answer.json()["jobId"], resource.value(n)))
                    else:
                        resource.refused.append(f"{answer.status_code} {answer.text[:200]}")
                n += 1

    def accepted(self) -> int:
        return sum(len(r.job_ids()) for r in self.resources)

    def wait_accepted(self, count: int, timeout: float = 60) -> None:
        wait_until(lambda: self.accepted() >= count, timeout, f"{count} jobs accepted")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        assert not any(t.is_alive() for t in self._threads), "stream clients did not stop"


def free_port_run(count: int) -> int:
    """A port P with P .. P+count-1 all free (the workers' METRICS_PORT + WORKER_ID)."""
    for _ in range(50):
        base = free_port()
        with contextlib.ExitStack() as held:
            try:
                for port in range(base, base + count):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return base
    raise RuntimeError(f"no {count} consecutive free ports")


def worker_drains(port: int) -> float | None:
    """``shop_drains_total`` of the worker serving its metrics on ``port`` (None: no answer)."""
    return drains_of("127.0.0.1", port)


@contextlib.contextmanager
def control(rig: Rig) -> Iterator[Celery]:
    """A Celery app on the rig's broker, for remote control only (ping, inspect)."""
    app = Celery("scaling-test", broker=redis_url_for(rig.redis.url, REDIS_DB_BROKER))
    try:
        yield app
    finally:
        app.close()


def nodes(app: Celery) -> set[str]:
    return {name for reply in app.control.ping(timeout=1.0) or [] for name in reply}


def node_draining(app: Celery, candidates: dict[str, str], timeout: float) -> str | None:
    """The process key of a worker that has a drain running, if one is seen in ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        active = app.control.inspect(timeout=0.3).active() or {}
        for node, tasks in active.items():
            if tasks and node in candidates:
                return candidates[node]
    return None


def hot_resources(rig: Rig) -> list[Resource]:
    """3 products on distinct product partitions and 3 users on distinct user partitions."""
    products: list[Resource] = []
    seen: set[str] = set()
    with requests.Session() as http:
        while len(products) < 3:
            answer = http.post(
                f"{rig.base_url}/v1/products",
                json={"name": f"hot {uuid.uuid4().hex[:8]}", "price": 100, "stock": 1},
                headers=ADMIN,
                timeout=30,
            )
            assert answer.status_code == 201, answer.text
            product_id = answer.json()["id"]
            queue = partition(PartitionKind.PRODUCT, product_id, PARTITIONS)
            if queue not in seen:
                seen.add(queue)
                products.append(Resource("product", product_id))
    users: list[Resource] = []
    user = 5000
    while len(users) < 3:
        user += 1
        queue = partition(PartitionKind.USER, user, PARTITIONS)
        if queue not in seen:
            seen.add(queue)
            users.append(Resource("user", user))
    return products + users


def check_order(rig: Rig, resources: list[Resource], report: Report) -> None:
    """Each resource's jobs: applied once, in acceptance order, with the right end state."""
    for resource in resources:
        job_ids = resource.job_ids()
        rows = rig.query(
            "SELECT id::text, status, result FROM jobs WHERE id = ANY(%s::uuid[])"
            " ORDER BY finished_at, seq",
            (job_ids,),
        )
        by_id = {row[0]: row for row in rows}
        missing = [j for j in job_ids if by_id.get(j, (None, None))[1] != "SUCCEEDED"]
        report.lost += len(missing)
        if missing:
            report.problem(f"{resource.kind} {resource.id}: {len(missing)} jobs not SUCCEEDED")
        if [row[0] for row in rows] != job_ids:
            report.problem(f"{resource.kind} {resource.id}: applied out of acceptance order")
        if resource.kind == "product":
            stock = rig.query("SELECT stock FROM products WHERE id = %s", (resource.id,))[0][0]
            last = resource.accepted[-1][1]
            if stock != last:
                report.problem(f"product {resource.id} stock {stock} != last STOCK_SET {last}")
            read = requests.get(f"{rig.base_url}/v1/products/{resource.id}", timeout=15).json()
            if read.get("stock") != last:
                report.problem(f"GET product {resource.id} shows {read} after STOCK_SET {last}")
            continue
        histories = rig.query(
            "SELECT job_id::text, amount, balance_after FROM point_histories"
            " WHERE user_id = %s ORDER BY id",
            (resource.id,),
        )
        applied = [row[0] for row in histories]
        report.doubled += len(applied) - len(set(applied)) + len(set(applied) - set(job_ids))
        if applied != job_ids:
            report.problem(f"user {resource.id}: point histories not in acceptance order")
        amounts = [value for _, value in resource.accepted]
        running = [sum(amounts[: i + 1]) for i in range(len(amounts))]
        if [row[2] for row in histories] != running:
            report.problem(f"user {resource.id}: balance chain differs from the charges'")
        balance = rig.query("SELECT balance FROM points WHERE user_id = %s", (resource.id,))
        if balance != [(sum(amounts),)]:
            report.problem(f"user {resource.id} balance {balance} != {sum(amounts)} charged")


def scrape_web(rig: Rig) -> dict[str, float]:
    text = requests.get(f"{rig.base_url}/metrics", timeout=15).text
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            totals[s.name] = totals.get(s.name, 0.0) + s.value
    return totals


def test_workers_scaled_1_to_3_to_2_keep_every_job_and_every_resources_order(
    tmp_path: Path,
) -> None:
    metrics_base = free_port_run(3)
    host = socket.gethostname()
    with private_rig(tmp_path, {"METRICS_PORT": str(metrics_base)}) as rig, control(rig) as app:
        resources = hot_resources(rig)
        report = Report("workers 1 -> 3 -> 2, one SIGKILLed, hot resources")
        stream = Stream(rig.base_url, resources)
        try:
            stream.wait_accepted(60)  # one worker
            joined = {
                f"partitions{i}@{host}": rig.stack.start("worker", worker_id=i) for i in (1, 2)
            }
            wanted = {f"partitions{i}@{host}" for i in range(3)}
            wait_until(lambda: wanted <= nodes(app), 90, f"nodes {sorted(wanted)} answering")
            # Each joined worker drains partitions (its own metrics port says how many).
            wait_until(
                lambda: all((worker_drains(metrics_base + i) or 0) > 0 for i in (1, 2)),
                60,
                "the joined workers draining",
            )
            candidates = {**joined, f"partitions0@{host}": "worker"}
            victim = node_draining(app, candidates, timeout=10) or "worker-1"
            rig.stack.kill(victim)  # SIGKILL
            killed_at = time.monotonic()
            held = rig.unacked_partition_messages()  # wake-ups taken and never acknowledged
            accepted_at_kill = stream.accepted()
            # The killed worker's partitions keep their wake flags (set while it drained):
            # web sends no wake-up for them until the sweeper re-sends one.  Taken over:
            # every job accepted up to a second after the kill is applied.
            stream.wait_accepted(accepted_at_kill + int(6 * RATE_PER_RESOURCE))
            after_kill = [j for r in resources for j in r.job_ids()]

            def taken_over() -> bool:
                pending = rig.query(
                    "SELECT count(*) FROM jobs WHERE id = ANY(%s::uuid[]) AND status = 'PENDING'",
                    (after_kill,),
                )
                return pending[0][0] == 0

            wait_until(taken_over, RECOVERY_DEADLINE, "the killed worker's partitions taken over")
            recovery = time.monotonic() - killed_at
            survivors = wanted - {n for n, key in candidates.items() if key == victim}
            assert nodes(app) >= survivors
            stream.wait_accepted(len(after_kill) + 120)  # two workers
        finally:
            stream.stop()
        settled = wait_settled(rig, 120)
        if settled is None:
            report.problem("jobs still PENDING 120 s after the stream stopped")
        report.recovery_seconds = recovery
        report.sent = stream.accepted() + sum(len(r.refused) for r in resources)
        report.accepted = stream.accepted()
        for resource in resources:
            for refusal in resource.refused:
                report.problem(f"{resource.kind} {resource.id}: {refusal}")
        check_order(rig, resources, report)
        accepted_metric = scrape_web(rig).get("shop_jobs_accepted_total")
        if accepted_metric != report.accepted:
            report.problem(f"/metrics counts {accepted_metric} accepted, {report.accepted} 202s")
        report.succeeded = report.accepted - report.lost
        report.notes.update(
            victim=victim,
            held_at_kill=held,
            accepted_at_kill=accepted_at_kill,
            since_kill=f"{time.monotonic() - killed_at:.1f}s",
            per_resource=min(len(r.accepted) for r in resources),
        )
        report.print()
        if report.problems:
            print(rig.log_excerpt(), flush=True)
    assert not report.problems, report.line()
    assert (report.lost, report.doubled) == (0, 0)
