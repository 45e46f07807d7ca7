"""Scenario 4: the history listener is SIGKILLed mid-stream of orders, then restarted."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults.harness import (
    ORDERS_ONLY,
    Ledger,
    Load,
    open_shop,
    private_rig,
    settle_and_check,
    warm_up,
)

pytestmark = pytest.mark.faults


def test_history_listener_killed_mid_stream_loses_and_doubles_no_history(tmp_path: Path) -> None:
    with private_rig(tmp_path) as rig:
        shop = open_shop(rig, stocks=(300, 300, 600))
        ledger = Ledger()
        load = Load(rig, shop, ledger, seed=4)
        try:
            warm_up(rig, load)
            stream = load.stream(250, rate=80, mix=ORDERS_ONLY)
            stream.wait_sent(80)
            rig.stack.kill("history")  # SIGKILL, while it turns outbox rows into history
            stream.wait_sent(170)  # orders keep coming with no listener (and no sweeper)
            undelivered = rig.query("SELECT count(*) FROM outbox WHERE delivered_at IS NULL")[0][0]
            rig.stack.start("history")
            restarted = time.monotonic()
            stream.join()
            report = settle_and_check(
                rig,
                shop,
                ledger,
                "4 history listener SIGKILL",
                recovered_at=restarted,
                notes={"undelivered_at_restart": undelivered},
            )
        finally:
            load.close()
    assert not report.problems, report.line()
