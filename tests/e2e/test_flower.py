"""Flower as an operator sees it, in a real headless browser, on a private stack.

Flower (``python -m workers.flower``, as the Procfile starts it) runs with
``FLOWER_BASIC_AUTH``: every page asks for it.  The Workers tab shows each node
by its distinct name, a worker's page lists the queues it consumes, and the
Broker tab lists every partition queue, ``history`` and ``maintenance`` with its
backlog: with the partition worker stopped, jobs leave one wake-up in each of
their partitions' queues, and the Broker tab shows exactly those.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from shared.embedded import free_port
from shared.partitions import HISTORY_QUEUE, PartitionKind, all_partition_queues, partition
from tests.browser import dump_dom, screenshot
from tests.faults.harness import Rig, private_rig, wait_until
from tests.stack import ROOT, run_in_production

pytestmark = pytest.mark.e2e

USER, PASSWORD = "operator", "flower-secret"
PARTITIONS = 16
QUEUES = {*all_partition_queues(PARTITIONS), HISTORY_QUEUE, "maintenance"}
_ROW = re.compile(r'<tr id="([^"]+)">\s*<td>[^<]*</td>\s*<td[^>]*>(\d+)</td>')


class Flower:
    def __init__(self, rig: Rig, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        env = rig.stack.env() | {"FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers.flower", "--address=127.0.0.1", f"--port={self.port}"],
            cwd=ROOT,
            env=env,
            stdout=log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def url(self, path: str, *, auth: bool = True) -> str:
        credentials = f"{USER}:{PASSWORD}@" if auth else ""
        return f"http://{credentials}127.0.0.1:{self.port}{path}"

    def up(self) -> bool:
        assert self.proc.poll() is None, self.log_path.read_text()
        try:
            return requests.get(self.url("/broker"), timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def rig_and_flower(tmp_path: Path) -> Iterator[tuple[Rig, Flower]]:
    with private_rig(tmp_path) as rig:
        flower = Flower(rig, tmp_path / "flower.log")
        try:
            wait_until(flower.up, 90, "Flower answers")
            yield rig, flower
        finally:
            flower.stop()


def broker_rows(html: str) -> dict[str, int]:
    return {name: int(messages) for name, messages in _ROW.findall(html)}


def test_flower_shows_workers_queues_and_backlogs_behind_basic_auth(
    rig_and_flower: tuple[Rig, Flower], tmp_path: Path
) -> None:
    rig, flower = rig_and_flower
    for auth in (None, (USER, "wrong")):
        assert (
            requests.get(flower.url("/broker", auth=False), auth=auth, timeout=5).status_code == 401
        )
    host = socket.gethostname()

    expected = (f"partitions0@{host}", f"history-{rig.stack.port}@{host}")
    # Flower fills its workers table as each worker answers its inspection: poll the page.
    pages: list[str] = []

    def all_listed() -> bool:
        pages.append(dump_dom(flower.url("/workers"), tmp_path))
        return all(name in pages[-1] for name in expected)

    wait_until(all_listed, 60, "both workers listed in Flower")
    screenshot(flower.url("/workers"), tmp_path / "flower-workers.png", tmp_path)

    page = dump_dom(flower.url(f"/worker/partitions0@{host}"), tmp_path)
    consumed = set(re.findall(r"\b((?:user|product|coupon)\.\d+)\b", page))
    assert consumed == set(all_partition_queues(PARTITIONS))

    # No partition worker (and no sweeper re-sending): each kind's one wake-up waits in
    # the partition queue of the job that sent it; a second job of a kind, on another
    # partition, sends none (its kind's wake-up is in flight: a drain takes every
    # partition of the kind).
    rig.stack.kill("beat")
    rig.stack.kill("worker")
    sends = [
        ("/v1/points/charge", {"userId": 7, "amount": 5}, PartitionKind.USER, 7),
        (
            "/v1/orders",
            {"userId": 7, "orderLines": [{"productId": 3, "quantity": 1}]},
            PartitionKind.PRODUCT,
            3,
        ),
        ("/v1/coupons/5/issue", {"userId": 7}, PartitionKind.COUPON, 5),
    ]
    woken = {partition(kind, key, PARTITIONS) for _, _, kind, key in sends}
    second = next(
        user
        for user in range(8, 200)
        if partition(PartitionKind.USER, user, PARTITIONS) not in woken
    )
    sends.append(("/v1/points/charge", {"userId": second, "amount": 5}, PartitionKind.USER, 0))
    for path, body, _, _ in sends:
        answer = requests.post(f"{rig.base_url}{path}", json=body, timeout=10)
        assert answer.status_code == 202, answer.text
    wait_until(lambda: all(rig.queued_messages().get(q) == 1 for q in woken), 30, "wake-ups queued")

    rows = broker_rows(dump_dom(flower.url("/broker"), tmp_path))
    assert set(rows) == QUEUES
    assert {name for name, messages in rows.items() if messages} == woken
    assert all(rows[q] == 1 for q in woken)
    screenshot(flower.url("/broker"), tmp_path / "flower-broker.png", tmp_path, size="1400,2900")
    assert "Inspect method" not in flower.log_path.read_text()


def test_flower_refuses_to_start_in_production_without_basic_auth(tmp_path: Path) -> None:
    answer = run_in_production(["-m", "workers.flower", f"--port={free_port()}"], AUTH_MODE="none")
    assert answer.returncode != 0
    assert "FLOWER_BASIC_AUTH is required when APP_ENV=production" in answer.stderr
