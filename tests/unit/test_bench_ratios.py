"""The harness's judgement of issue 15's targets (bench/run.py): closed-loop ratios per
round and their median, and CPU per job against the fewest web processes per load."""

from __future__ import annotations

from typing import Any

import pytest

from bench.report import cores_busy
from bench.run import ratios, scaling_rows

SPREAD = "closed loop, 32 users, 200 products"
HOT = "closed loop, 64 users, 1 hot product"


def closed(
    key: str, system: str, per_s: float, p99: float, *, round_no: int = 1, rounds: int = 1
) -> dict[str, Any]:
    scenario = SPREAD if key == "closed-spread" else HOT
    return {
        "section": "closed",
        "key": key,
        "scenario": scenario if rounds == 1 else f"{scenario}, round {round_no}",
        "base_scenario": scenario,
        "round": round_no,
        "system": system,
        "client": "prefer" if system == "this service" else "one POST (200)",
        "per_s": per_s,
        "cycle_p99_ms": p99,
    }


def judged(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if "target" in r]


def test_one_round_pairs_each_straight_design_then_judges_on_the_best() -> None:
    rows = [
        closed("closed-spread", "this service", 1_100, 50),
        closed("closed-spread", "straight design, 4 sync workers", 1_000, 40),
        closed("closed-spread", "straight design, 16 sync workers", 700, 80),
    ]
    out = ratios(rows)
    assert [r["against"] for r in out] == [
        "straight design, 4 sync workers",
        "straight design, 16 sync workers",
        "the best of them: 4 sync workers",
    ]
    assert out[0]["orders_ratio"] == pytest.approx(1.1)
    assert out[1]["orders_ratio"] == pytest.approx(1_100 / 700)
    assert out[2]["orders_ratio"] == pytest.approx(1.1)
    assert out[2]["p99_ratio"] == pytest.approx(1.25)
    assert out[2]["target"] == ">= 1.0x"
    assert out[2]["met"] is True


def test_the_hot_target_also_needs_a_lower_p99() -> None:
    rows = [
        closed("closed-hot", "this service", 2_100, 130),
        closed("closed-hot", "straight design, 4 sync workers", 1_000, 120),
    ]
    [verdict] = judged(ratios(rows))
    assert verdict["orders_ratio"] == pytest.approx(2.1)
    assert verdict["met"] is False  # twice the rate, but a longer p99


def test_rounds_are_judged_each_and_then_on_their_median() -> None:
    service = [1_500, 1_400, 1_600]
    straight = [700, 750, 750]
    rows = []
    for round_no, (mine, theirs) in enumerate(zip(service, straight, strict=True), start=1):
        rows += [
            closed("closed-hot", "this service", mine, 70, round_no=round_no, rounds=3),
            closed(
                "closed-hot",
                "straight design, 4 sync workers",
                theirs,
                120,
                round_no=round_no,
                rounds=3,
            ),
        ]
    verdicts = judged(ratios(rows))
    assert [v["met"] for v in verdicts] == [True, False, True, True]
    median = verdicts[-1]
    assert median["scenario"] == HOT
    assert median["against"] == "each round's best, median of 3 rounds"
    assert median["orders_ratio"] == pytest.approx(1_600 / 750)  # of 2.14, 1.87, 2.13
    assert median["p99_ratio"] == pytest.approx(70 / 120)


def test_web_processes_are_compared_within_each_load() -> None:
    def row(load: str, processes: int, web: float, worker: float) -> dict[str, Any]:
        return {
            "key": "web-scaling",
            "scaling_load": load,
            "web_processes": processes,
            "per_s": 1_000,
            "cpu_ms_per_job": {"web": web, "worker": worker},
        }

    out = scaling_rows(
        [
            row("closed", 2, 0.7, 0.3),
            row("open", 2, 1.0, 1.0),
            row("closed", 4, 0.95, 0.3),
            row("open", 4, 1.05, 1.0),
        ]
    )
    by = {(r["scaling_load"], r["web_processes"]): r for r in out}
    assert by["closed", 4]["cpu_ratio"] == pytest.approx(1.25)
    assert by["closed", 4]["met"] is False
    assert by["open", 4]["cpu_ratio"] == pytest.approx(1.025)
    assert by["open", 4]["met"] is True
    assert by["open", 2]["against"] == "2 web processes"


def test_cores_busy_is_the_cpu_of_every_group_over_the_measured_seconds() -> None:
    row = {"cpu_s": {"web": 12.0, "worker": 9.0, "generator": 3.0}, "cpu_wall_s": 16.0}
    assert cores_busy(row) == "1.50"
    # Rows measured without a window (ceilings, older JSON) say so rather than guess.
    assert cores_busy({"cpu_s": {"web": 1.0}}) == "-"
