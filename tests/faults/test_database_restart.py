"""Scenario 3: PostgreSQL is killed (-9) and restarted while jobs are accepted and applied.

Job POSTs during the outage answer 503 (no row) or 202 (row committed), never 500;
every 202 is applied exactly once after the restart.
"""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest

from tests.faults.harness import (
    Answer,
    Ledger,
    Load,
    Rig,
    open_shop,
    post_until,
    private_rig,
    probe_reads,
    settle_and_check,
    wait_settled,
    wait_until,
    warm_up,
)

pytestmark = pytest.mark.faults

IN_FLIGHT = """
SELECT count(*) FROM pg_stat_activity
WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND xact_start IS NOT NULL
"""


def wait_for_transactions(rig: Rig, timeout: float = 1.0) -> int:
    """Poll (briefly) until some client transaction is open, so the kill lands inside one."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(rig.pg.url, autocommit=True, connect_timeout=5) as conn:
        while True:
            row = conn.execute(IN_FLIGHT).fetchone()
            open_now = int(row[0]) if row else 0
            if open_now or time.monotonic() > deadline:
                return open_now
            time.sleep(0.001)


def first_refusal(answers: list[Answer], since: float) -> float:
    return min(a.sent_at + a.seconds for a in answers if a.status == 503) - since


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_database_restart_answers_503_or_202_and_applies_every_202_once(
    tmp_path: Path, how: str
) -> None:
    with private_rig(tmp_path) as rig:
        shop = open_shop(rig)
        ledger = Ledger()
        load = Load(rig, shop, ledger, seed=3)
        try:
            warm_up(rig, load)
            some_job = next(iter(ledger.accepted()))
            stream = load.stream(550, rate=60)
            stream.wait_sent(120)
            in_flight = wait_for_transactions(rig)
            if how == "kill":
                rig.pg.kill()  # SIGKILL to the postmaster's group: crash recovery at start
            else:
                rig.pg.stop()  # fast shutdown: sessions are terminated, transactions rolled back
            down_at = time.monotonic()

            def outage_met() -> bool:
                refused = sum(
                    1 for a in ledger.snapshot() if a.status == 503 and a.sent_at >= down_at
                )
                return refused >= 10 and time.monotonic() - down_at >= 3

            # Stay down while the stream meets the outage (some 503s, at least 3 s), then restart.
            wait_until(outage_met, 30, "503s while the database is down")
            reads = probe_reads(rig, shop, some_job)
            rig.pg.start()  # same port and data directory
            up_at = time.monotonic()
            stream.join()
            settled = wait_settled(rig)
            assert settled is not None, "jobs accepted before the outage were not applied"
            # Job POSTs are accepted again once the breaker lets a trial through.
            probe = post_until(load, 202)
            first_202_after = probe[-1].sent_at + probe[-1].seconds - up_at
            more = load.run(60, threads=4)
            assert all(a.status == 202 for a in more), [(a.status, a.code) for a in more]
            answers = ledger.snapshot()
            during = [a for a in answers if down_at <= a.sent_at < up_at]
            report = settle_and_check(
                rig,
                shop,
                ledger,
                f"3 database {how} + restart",
                recovered_at=up_at,
                recovery_seconds=settled - up_at,
                allowed_statuses=frozenset({202, 503}),
                notes={
                    "transactions_at_kill": in_flight,
                    "outage": f"{up_at - down_at:.1f}s",
                    "posts_during_outage": len(during),
                    "202_during_outage": sum(a.status == 202 for a in during),
                    "first_503_after_kill": f"{first_refusal(during, down_at):.2f}s",
                    "outage_answer_max": f"{max(a.seconds for a in during) * 1000:.0f}ms",
                    "503_after_restart": sum(
                        a.status == 503 for a in answers if a.sent_at >= up_at
                    ),
                    "first_202_after_restart": f"{first_202_after:.1f}s",
                    "reads_during_outage": reads,
                },
            )
        finally:
            load.close()
    assert not report.problems, report.line()
    assert report.unavailable > 0, "the outage should have been answered 503"
    for name in ("job", "job_wait", "balance", "coupon", "readyz"):
        assert reads[name] == (503, "UNAVAILABLE") or (
            name == "readyz" and reads[name][0] == 503
        ), reads
    assert reads["product"][0] in (200, 503), reads
