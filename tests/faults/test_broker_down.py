"""Scenario 5: Redis stops.  Once the broker breaker is open, job POSTs answer 503 with
Retry-After (and write nothing); when Redis is back they are accepted again, and every
job accepted before or during the outage is applied (the sweeper delivers it)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.faults.harness import (
    Answer,
    Ledger,
    Load,
    open_shop,
    post_until,
    private_rig,
    probe_reads,
    settle_and_check,
    wait_settled,
    warm_up,
)

pytestmark = pytest.mark.faults

# Consecutive 503s that show every web process's broker breaker open.
OPEN_STREAK = 10


def probe_outage(
    load: Load, stopped_at: float, *, hold: float, timeout: float = 60
) -> list[Answer]:
    """POST one job at a time until OPEN_STREAK 503s in a row and ``hold`` seconds past the first
    503 (so the breakers also go half-open and refuse again); every answer is recorded."""
    answers: list[Answer] = []
    first_503: float | None = None
    streak = 0
    while time.monotonic() - stopped_at < timeout:
        answer = load.send(load.requests(1)[0])
        answers.append(answer)
        streak = streak + 1 if answer.status == 503 else 0
        if answer.status == 503 and first_503 is None:
            first_503 = answer.sent_at
        held = first_503 is not None and time.monotonic() - first_503 >= hold
        if streak >= OPEN_STREAK and held:
            return answers
        time.sleep(0.05)  # a probe, one request at a time
    raise AssertionError(f"breaker never settled open: {[a.status for a in answers]}")


def test_broker_down_answers_503_then_recovers_every_accepted_job(tmp_path: Path) -> None:
    with private_rig(tmp_path) as rig:
        shop = open_shop(rig)
        ledger = Ledger()
        load = Load(rig, shop, ledger, seed=5)
        try:
            warm_up(rig, load)
            rig.stack.kill("worker", signal.SIGTERM)  # jobs accepted now wait in the broker
            before = load.run(150, threads=6)
            assert all(a.status == 202 for a in before), [(a.status, a.code) for a in before]
            rig.redis.stop()
            stopped_at = time.monotonic()
            rig.stack.start("worker")  # starts while the broker is away, must connect later
            # Past one breaker reset (5 s), so half-open trials are seen refusing too.
            probe = probe_outage(load, stopped_at, hold=6.0)
            refused = [a for a in probe if a.status == 503]
            first = refused[0]
            assert {a.status for a in probe} <= {202, 503}, [(a.status, a.code) for a in probe]
            assert all(a.retry_after and a.code == "UNAVAILABLE" for a in refused)
            reads = probe_reads(rig, shop, before[0].job_id or "")
            rig.redis.start()  # same port, empty
            up_at = time.monotonic()
            again = post_until(load, 202)
            settled = wait_settled(rig)
            assert settled is not None, "jobs accepted before the outage were not applied"
            more = load.run(60, threads=4)
            assert all(a.status == 202 for a in more), [(a.status, a.code) for a in more]
            report = settle_and_check(
                rig,
                shop,
                ledger,
                "5 broker down",
                recovered_at=up_at,
                recovery_seconds=settled - up_at,
                allowed_statuses=frozenset({202, 503}),
                notes={
                    "202_before_open": sum(a.status == 202 for a in probe),
                    "first_503_after_stop": f"{first.sent_at + first.seconds - stopped_at:.2f}s",
                    "first_503s_took": ",".join(f"{a.seconds * 1000:.0f}ms" for a in refused[:5]),
                    "503_latency_max": f"{max(a.seconds for a in refused) * 1000:.0f}ms",
                    "202s_in_window_took": ",".join(
                        f"{a.seconds * 1000:.0f}ms" for a in probe if a.status == 202
                    ),
                    "reads_during_outage": reads,
                    "first_202_after_restart": (
                        f"{again[-1].sent_at + again[-1].seconds - up_at:.1f}s"
                    ),
                },
            )
        finally:
            load.close()
    assert not report.problems, report.line()
    # Reads need no broker: PostgreSQL answers them (the cache is skipped while Redis is away).
    for name in ("job", "job_wait", "balance", "product", "coupon"):
        assert reads[name][0] == 200, reads
    assert reads["readyz"][0] == 503, reads
