"""The partition worker is SIGKILLed in the middle of a stream of payments.

Payments (ORDER_PAY on the users' partitions) interleaved with the same users'
charges and uses; the worker is killed while it drains, twice (the second time in
the backlog that piled up while it was down).  Every 202 must be applied exactly
once: no payment lost, none applied twice (one debit and one COMPLETED history per
paid order), every balance equal to charges - uses - payments.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults.harness import (
    PAYMENTS_MIX,
    Ledger,
    Load,
    kill_worker_while_draining,
    open_orders,
    open_shop,
    private_rig,
    settle_and_check,
    warm_up,
)

pytestmark = pytest.mark.faults


def test_worker_killed_mid_stream_of_payments_loses_and_doubles_nothing(tmp_path: Path) -> None:
    with private_rig(tmp_path) as rig:
        shop = open_shop(rig, stocks=(2_000, 2_000, 2_000))
        ledger = Ledger()
        load = Load(rig, shop, ledger, seed=7)
        try:
            warm_up(rig, load)
            open_orders(rig, load, 150, fund=20_000)
            stream = load.stream(300, rate=100, mix=PAYMENTS_MIX)
            stream.wait_sent(100)
            held_first = kill_worker_while_draining(rig, timeout=1)
            sent_at_kill = stream.sent
            stream.wait_sent(200)  # payments keep being accepted while no worker runs
            rig.stack.start("worker")
            held_second = kill_worker_while_draining(rig, timeout=20)
            pending = rig.query(
                "SELECT count(*) FROM jobs WHERE status = 'PENDING' AND kind = 'ORDER_PAY'"
            )[0][0]
            rig.stack.start("worker")
            restarted = time.monotonic()
            stream.join()
            report = settle_and_check(
                rig,
                shop,
                ledger,
                "worker SIGKILL x2 in a stream of payments",
                recovered_at=restarted,
                notes={
                    "sent_at_kill": sent_at_kill,
                    "held_at_kills": (held_first, held_second),
                    "payments_pending_at_second_kill": pending,
                    "orders_open": len(shop.payable),
                },
            )
            paid = rig.query("SELECT count(*) FROM orders WHERE status = 'COMPLETED'")[0][0]
            print(f"PAYMENT-FIGURES worker-kill: orders={len(shop.payable)} paid={paid}")
        finally:
            load.close()
    assert paid > 0, "no payment succeeded: the test proved nothing"
    assert not report.problems, report.line()
