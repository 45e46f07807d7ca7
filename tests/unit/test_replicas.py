"""Choosing a replica: covered recently enough, healthy, in turn; the WAL position a
caught-up standby reports; a server that is no standby is never chosen."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import sessionmaker

from shared.config import Settings
from shared.db import make_probe_engine
from shared.replicas import (
    LONG_PAGE_HEADER,
    SHORT_PAGE_HEADER,
    Replica,
    ReplicaSet,
    end_of_wal,
)

BLOCK, SEGMENT = 8192, 16 * 1024 * 1024


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _replica(name: str, engine: Engine, *, covered_at: float | None, healthy: bool) -> Replica:
    return Replica(
        name=name,
        sessions=sessionmaker(bind=engine),
        probe=engine,
        covered_at=covered_at,
        healthy=healthy,
    )


def _unused_engine() -> Engine:
    return create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")


def test_a_caught_up_standby_reports_the_page_boundary_not_the_next_records_start() -> None:
    assert end_of_wal(5 * BLOCK + 312, BLOCK, SEGMENT) == 5 * BLOCK + 312
    assert end_of_wal(5 * BLOCK + SHORT_PAGE_HEADER, BLOCK, SEGMENT) == 5 * BLOCK
    assert end_of_wal(3 * SEGMENT + LONG_PAGE_HEADER, BLOCK, SEGMENT) == 3 * SEGMENT
    # 40 bytes into a page that does not start a segment is an ordinary position.
    assert end_of_wal(5 * BLOCK + LONG_PAGE_HEADER, BLOCK, SEGMENT) == 5 * BLOCK + 40


def test_pick_takes_the_fit_replicas_in_turn() -> None:
    clock, engine = Clock(), _unused_engine()
    fresh = _replica("fresh", engine, covered_at=999.8, healthy=True)
    also = _replica("also", engine, covered_at=999.5, healthy=True)
    stale = _replica("stale", engine, covered_at=990.0, healthy=True)
    down = _replica("down", engine, covered_at=1000.0, healthy=False)
    unknown = _replica("unknown", engine, covered_at=None, healthy=True)
    replicas = ReplicaSet(
        engine, [fresh, also, stale, down, unknown], max_lag=5.0, interval=0.5, clock=clock
    )
    picks = [replicas.pick(1.0) for _ in range(4)]
    assert [p[0].name for p in picks if p] == ["fresh", "also", "fresh", "also"]
    assert picks[0] is not None
    assert abs(picks[0][1] - 0.2) < 1e-9  # how far behind its data may be
    # The read's bound and REPLICA_MAX_LAG_MS: the smaller one counts.
    assert [p[0].name for p in (replicas.pick(0.3), replicas.pick(0.3)) if p] == ["fresh"] * 2
    assert {p[0].name for p in (replicas.pick(60), replicas.pick(60), replicas.pick(60)) if p} == {
        "fresh",
        "also",
    }
    clock.now = 1001.0
    assert replicas.pick(1.0) is None  # every coverage aged past the bound: the primary


def test_a_read_that_failed_skips_the_replica_until_a_check_finds_it_well() -> None:
    clock, engine = Clock(), _unused_engine()
    only = _replica("only", engine, covered_at=1000.0, healthy=True)
    replicas = ReplicaSet(engine, [only], max_lag=1.0, interval=0.5, clock=clock)
    assert replicas.pick(1.0) is not None
    replicas.mark_down(only, "a read failed: connection refused")
    assert replicas.pick(1.0) is None
    assert replicas.status() == [("only", False, 0.0, "a read failed: connection refused")]


def test_a_server_that_is_no_standby_is_never_picked(settings: Settings) -> None:
    """The test database stands in as a 'replica' of itself: it is not in recovery."""
    probe = make_probe_engine(settings, settings.sqlalchemy_url, "test-probe")
    try:
        primary = _replica("primary-itself", probe, covered_at=None, healthy=False)
        replicas = ReplicaSet(probe, [primary], max_lag=1.0, interval=0.5, settle=0)
        replicas.check()
        assert replicas.pick(1.0) is None
        (_name, healthy, _behind, problem) = replicas.status()[0]
        assert not healthy
        assert problem is not None
        assert "not a standby" in problem
    finally:
        probe.dispose()


def test_an_unreachable_primary_moves_no_coverage_on(settings: Settings) -> None:
    clock = Clock()
    dead = make_probe_engine(settings, "postgresql+psycopg://nobody@127.0.0.1:1/none", "dead")
    replica = _replica("r", dead, covered_at=999.0, healthy=True)
    replicas = ReplicaSet(dead, [replica], max_lag=1.0, interval=0.5, settle=0, clock=clock)
    replicas.check()
    assert replica.covered_at == 999.0
    clock.now = 1000.5
    assert replicas.pick(1.0) is None
