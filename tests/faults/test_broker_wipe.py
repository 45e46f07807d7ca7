"""Scenario 2: Redis restarts without its data while jobs are queued; the sweeper recovers."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.faults.harness import (
    Ledger,
    Load,
    open_shop,
    private_rig,
    settle_and_check,
    wait_settled,
    warm_up,
)

pytestmark = pytest.mark.faults


def test_broker_losing_its_queues_loses_no_job(tmp_path: Path) -> None:
    with private_rig(tmp_path) as rig:
        shop = open_shop(rig)
        ledger = Ledger()
        load = Load(rig, shop, ledger, seed=2)
        try:
            warm_up(rig, load)
            rig.stack.kill("worker", signal.SIGTERM)  # no consumer: jobs and wake-ups pile up
            answers = load.run(200, threads=6)
            assert all(a.status == 202 for a in answers)
            queued = sum(rig.queued_messages().values())
            assert queued > 0, "the wake-ups should be waiting in the broker"
            # Beat is held off while Redis is away, so that the check below sees the
            # loss before the sweeper starts repairing it (they would race otherwise).
            rig.stack.kill("beat", signal.SIGTERM)
            rig.redis.stop()
            rig.redis.wipe()
            # Down for a moment, so the history listener and web see it gone.
            time.sleep(2)
            rig.redis.start()  # same port, empty: every queued wake-up is lost
            assert sum(rig.queued_messages().values()) == 0
            rig.stack.start("beat")
            rig.stack.start("worker")
            restarted = time.monotonic()
            settled = wait_settled(rig)
            assert settled is not None, "the sweeper did not deliver the jobs queued before"
            # And the system works normally afterwards.
            more = load.run(60, threads=4)
            assert all(a.status == 202 for a in more), [(a.status, a.code) for a in more]
            report = settle_and_check(
                rig,
                shop,
                ledger,
                "2 broker wiped",
                recovered_at=restarted,
                recovery_seconds=settled - restarted,
                notes={"wake_ups_lost": queued},
            )
        finally:
            load.close()
    assert not report.problems, report.line()
