"""Scenario 6: the connection breaks at web's COMMIT of a job row.

* after the server committed (the answer is lost): the row exists, so the answer must be
  202, never 503 (API.md: "a 503 is only ever answered when no job row was committed"),
  and the job is applied once;
* before the COMMIT reached the server: nothing was committed, the answer is 503.

Both made deterministic by a proxy between the stack and PostgreSQL.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults.harness import (
    Answer,
    Ledger,
    Load,
    Rig,
    open_shop,
    private_rig,
    settle_and_check,
    wait_until,
    warm_up,
)
from tests.faults.proxy import JOB_FINISH

pytestmark = pytest.mark.faults

CUTS = 3


def cut_one(rig: Rig, load: Load, *, before: bool) -> Answer:
    assert rig.cutter is not None
    rig.cutter.arm(1, before=before)
    answer = load.send(load.requests(1)[0])
    assert rig.cutter.armed == 0, "the job's COMMIT went through uncut"
    # A normal job after each cut: a success resets the database breaker's failure count.
    load.send(load.requests(1)[0])
    return answer


def test_a_commit_whose_answer_is_lost_is_answered_202_and_applied_once(tmp_path: Path) -> None:
    with private_rig(tmp_path, cut_commits=True) as rig:
        shop = open_shop(rig)
        ledger = Ledger()
        load = Load(rig, shop, ledger, seed=6)
        try:
            warm_up(rig, load)
            after = [cut_one(rig, load, before=False) for _ in range(CUTS)]
            before = [cut_one(rig, load, before=True) for _ in range(CUTS)]
            started = time.monotonic()
            more = load.run(60, threads=4)
            report = settle_and_check(
                rig,
                shop,
                ledger,
                "6 COMMIT answer lost",
                recovered_at=started,
                allowed_statuses=frozenset({202, 503}),
                notes={
                    "cut_after_commit": [a.status for a in after],
                    "cut_before_commit": [a.status for a in before],
                    "cut_answers_took": ",".join(
                        f"{a.seconds * 1000:.0f}ms" for a in after + before
                    ),
                },
            )
        finally:
            load.close()
    assert not report.problems, report.line()
    assert [a.status for a in after] == [202] * CUTS
    assert [(a.status, a.code) for a in before] == [(503, "UNAVAILABLE")] * CUTS
    assert all(a.status == 202 for a in more)


def test_a_worker_commit_whose_answer_is_lost_applies_its_jobs_once(tmp_path: Path) -> None:
    with private_rig(tmp_path, cut_commits=True) as rig:
        cutter = rig.cutter
        assert cutter is not None
        shop = open_shop(rig)
        ledger = Ledger()
        load = Load(rig, shop, ledger, seed=7)
        try:
            warm_up(rig, load)
            for before in (False, True, False):
                cutter.arm(1, before=before, statement=JOB_FINISH)
                load.run(40, threads=4)
                wait_until(lambda: cutter.armed == 0, 60, "a worker's COMMIT to cut")
            cut_at = time.monotonic()
            report = settle_and_check(
                rig,
                shop,
                ledger,
                "6b worker COMMIT answer lost",
                recovered_at=cut_at,
                notes={"cuts": cutter.cuts},
            )
        finally:
            load.close()
    assert not report.problems, report.line()
