"""Scenario 1: the partition worker is SIGKILLed mid-stream, then started again.

It is killed twice: once while the stream runs, and once more while it drains the
backlog that piled up meanwhile (a large batch transaction rolled back).  Each
kill waits (briefly) until the worker holds a wake-up, i.e. is inside a drain.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults.harness import (
    Ledger,
    Load,
    kill_worker_while_draining,
    open_shop,
    private_rig,
    settle_and_check,
    warm_up,
)

pytestmark = pytest.mark.faults


def test_partition_worker_killed_mid_stream_applies_every_job_once(tmp_path: Path) -> None:
    with private_rig(tmp_path) as rig:
        shop = open_shop(rig)
        ledger = Ledger()
        load = Load(rig, shop, ledger, seed=1)
        try:
            warm_up(rig, load)
            stream = load.stream(300, rate=100)
            stream.wait_sent(100)
            held_first = kill_worker_while_draining(rig, timeout=1)
            sent_at_kill = stream.sent
            stream.wait_sent(200)  # jobs keep being accepted while no worker runs
            rig.stack.start("worker")
            # Killed again while it drains the backlog (it boots first: allow some seconds).
            held_second = kill_worker_while_draining(rig, timeout=20)
            pending = rig.query("SELECT count(*) FROM jobs WHERE status = 'PENDING'")[0][0]
            rig.stack.start("worker")
            restarted = time.monotonic()
            stream.join()
            last_answer = max(a.sent_at + a.seconds for a in ledger.snapshot())
            report = settle_and_check(
                rig,
                shop,
                ledger,
                "1 worker SIGKILL x2",
                recovered_at=restarted,
                notes={
                    "sent_at_kill": sent_at_kill,
                    "held_at_kills": (held_first, held_second),
                    "pending_at_second_kill": pending,
                    "stream_after_restart": f"{last_answer - restarted:.1f}s",
                },
            )
        finally:
            load.close()
    assert not report.problems, report.line()
