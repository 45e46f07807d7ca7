"""Network partitions, for real (issue 16): a process in a network namespace of its own,
joined to the test's servers by a veth pair in a private /30; its link to PostgreSQL or
Redis is blackholed mid-stream (nft DROP both ways in its namespace: packets vanish, no
reset), then healed.

* A partition worker cut off from PostgreSQL while it holds a partition: the server
  ends its session (idle in transaction, or TCP keepalive / tcp_user_timeout), the
  other worker drains the partition within the bound; after the heal the cut-off
  worker drains again by itself; every 202 applied once, and nothing announced twice.
* A partition worker cut off from Redis while it drains: its partitions are woken by
  the sweeper and drained by the other worker; after the heal it reconnects by itself.
* Web cut off from PostgreSQL: job POSTs and reads answer 503 within a few seconds,
  and no row is written for a request answered 503; after the heal, 202s again.

Only the test's own addresses are used: its servers listen on the veth's host side too,
and the namespace has nothing but the veth and loopback.  Where namespaces cannot be
made (no root, no nft), the tests skip with the exact error.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.gray import (
    Namespace,
    NamespaceUnavailable,
    Notifications,
    Waiting,
    backend_gone,
    drain_waiting_on_a_row,
    drainer_backends,
    drains_of,
    holds_partition,
    local_ports,
    namespace,
    wait_drains,
)
from tests.faults.harness import (
    Ledger,
    Load,
    Report,
    Rig,
    open_shop,
    private_rig,
    settle_and_check,
    wait_until,
    warm_up,
)
from tests.faults.test_frozen import PG_FROZEN_ANSWER_BOUND, TAKEOVER_BOUND, Probes, _finished_job
from tests.faults.test_worker_scaling import free_port_run

pytestmark = pytest.mark.faults

CUT_SECONDS = 20.0


@contextlib.contextmanager
def isolated(tag: str) -> Iterator[Namespace]:
    try:
        ns_context = namespace(tag)
        ns = ns_context.__enter__()
    except NamespaceUnavailable as exc:
        pytest.skip(f"network namespaces unavailable here: {exc}")
    try:
        yield ns
    finally:
        ns_context.__exit__(None, None, None)


def _via(rig: Rig, ns: Namespace) -> dict[str, str]:
    """The environment of a process in ``ns``: the servers by their veth address."""
    return {
        "DATABASE_URL": rig.pg.url_via(ns.host_address),
        "REDIS_URL": rig.redis.url_via(ns.host_address),
    }


def _cut_while_draining(
    rig: Rig, ns: Namespace, key: str, port: int, *, must_hold: bool, product_id: int
) -> int:
    """Blackhole ``ns``'s link to ``port`` of the host the moment worker ``key`` holds a
    partition; returns its backend.

    With ``must_hold`` (the cut must leave a drain transaction open), the worker is caught
    waiting on product ``product_id``'s row, which the test holds (deterministic); a drain
    of another worker caught instead is let go and the next one waited for.  Otherwise
    the cut falls on the worker the moment it is seen inside a drain."""
    pid = rig.stack.procs[key].pid
    if must_hold:
        for _ in range(20):
            with drain_waiting_on_a_row(rig, [key, "worker"], product_id) as drainer:
                if drainer.key == key:
                    ns.cut(port)
                    backend = drainer.backend
            if drainer.key == key:
                assert holds_partition(rig, backend), f"{key} let its partitions go"
                return backend
        raise AssertionError(f"{key} never caught waiting on product {product_id}")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ports = local_ports(pid)
        backend = next((b for b, _a, p in drainer_backends(rig) if p in ports), None)
        if backend is not None:
            ns.cut(port)
            return backend
    raise AssertionError(f"{key} never seen inside a drain")


@pytest.mark.parametrize("server", ["postgres", "redis"])
def test_a_worker_cut_off_mid_drain_loses_its_partitions_and_recovers(
    tmp_path: Path, server: str
) -> None:
    metrics = free_port_run(2)
    with (
        isolated(f"w{server[:2]}") as ns,
        private_rig(
            tmp_path,
            {"METRICS_PORT": str(metrics)},
            extra_address=ns.host_address,
            extra_clients=ns.cidr,
        ) as rig,
    ):
        rig.stack.start(
            "worker",
            worker_id=1,
            wrap=ns.exec,
            env_overrides=_via(rig, ns) | {"METRICS_ADDRESS": ns.address},
        )
        port = rig.pg.port if server == "postgres" else rig.redis.port
        shop = open_shop(rig, stocks=(400, 300, 2000), coupon_total=60)
        ledger = Ledger()
        load = Load(rig, shop, ledger, seed=17)
        notifications = Notifications(rig)
        report: Report | None = None
        try:
            warm_up(rig, load, n=30)
            wait_drains(ns.address, metrics + 1)  # the namespaced worker is up
            stream = load.stream(1400, rate=40)
            stream.wait_sent(80)
            waiting = Waiting(load)  # their outcomes are announced: none may be twice
            backend = _cut_while_draining(
                rig,
                ns,
                "worker-1",
                port,
                must_hold=server == "postgres",
                product_id=next(iter(shop.products)),
            )
            assert ns.cut_at is not None
            cut_at = ns.cut_at
            try:
                pending_at_cut = [
                    r[0] for r in rig.query("SELECT id FROM jobs WHERE status = 'PENDING'")
                ]
                released = (
                    wait_until(lambda: backend_gone(rig, backend), CUT_SECONDS, "lock released")
                    if server == "postgres"
                    else None
                )

                def applied() -> bool:
                    left = rig.query(
                        "SELECT count(*) FROM jobs WHERE id = ANY(%s) AND status = 'PENDING'",
                        (pending_at_cut,),
                    )
                    return left[0][0] == 0

                wait_until(applied, CUT_SECONDS, "the cut-off worker's partitions drained")
                taken_over = time.monotonic() - cut_at
                wait_until(lambda: time.monotonic() - cut_at >= CUT_SECONDS, 30, "the cut")
            finally:
                ns.heal()
            healed_at = time.monotonic()
            drains_at_heal = wait_drains(ns.address, metrics + 1)
            # Recovers by itself: drains again (the stream still runs), timed from the heal.
            wait_until(
                lambda: (drains_of(ns.address, metrics + 1) or 0) >= drains_at_heal + 3,
                90,
                "the cut-off worker draining again",
            )
            recovered = time.monotonic() - healed_at
            stream.join()
            waiting.stop()
            report = settle_and_check(
                rig,
                shop,
                ledger,
                f"worker-1 cut off from {server} {CUT_SECONDS:.0f}s mid-drain (netns, nft DROP)",
                allowed_statuses=frozenset({200, 202}),
                recovered_at=healed_at,
                notes={
                    "pending_at_cut": len(pending_at_cut),
                    "jobs_waited_for": waiting.sent,
                    "announced": len(notifications.documents),
                    "lock_released_after": "n/a" if released is None else f"{released:.1f}s",
                    "taken_over_after": f"{taken_over:.1f}s",
                    "cut_off_worker_draining_after_heal": f"{recovered:.1f}s",
                },
            )
            for problem in notifications.problems(rig):
                report.problem(problem)
            if taken_over > TAKEOVER_BOUND:
                report.problem(f"taken over after {taken_over:.1f}s (bound {TAKEOVER_BOUND}s)")
        finally:
            ns.heal()
            notifications.close()
            load.close()
    assert report is not None
    assert not report.problems, report.line()


def test_web_cut_off_from_postgres_answers_503_fast_and_recovers(tmp_path: Path) -> None:
    with (
        isolated("web") as ns,
        private_rig(
            tmp_path,
            processes=("worker", "history", "beat"),
            extra_address=ns.host_address,
            extra_clients=ns.cidr,
        ) as rig,
    ):
        rig.stack.host = ns.address  # web binds, and is reached, inside its namespace
        rig.stack.start("web", wrap=ns.exec, env_overrides=_via(rig, ns))
        shop = open_shop(rig)
        ledger = Ledger()
        load = Load(rig, shop, ledger, seed=18)
        try:
            warm_up(rig, load)
            probes = Probes(rig, shop, load, _finished_job(rig, load))
            ns.cut(rig.pg.port)
            try:
                started = time.monotonic()
                rounds = 0
                while time.monotonic() - started < CUT_SECONDS:
                    probes.round()
                    rounds += 1
            finally:
                ns.heal()
            healed = time.monotonic()
            wait_until(
                lambda: load.send(load.requests(1)[0]).status == 202, 60, "a 202 after the heal"
            )
            recovered = time.monotonic() - healed
            report = settle_and_check(
                rig,
                shop,
                ledger,
                f"web cut off from postgres {CUT_SECONDS:.0f}s (netns, nft DROP)",
                recovered_at=healed,
                allowed_statuses=frozenset({200, 202, 503}),
                notes={"rounds": rounds, "first_202_after_heal": f"{recovered:.1f}s"}
                | probes.summary(),
            )
        finally:
            load.close()
    problems = list(report.problems)
    for name, seconds in probes.slowest.items():
        if seconds > PG_FROZEN_ANSWER_BOUND:
            problems.append(f"{name}: an answer took {seconds:.1f}s with PostgreSQL cut off")
    for name in ("post", "post_prefer_wait", "balance"):
        if not probes.statuses[name] <= {503}:
            problems.append(f"{name} answered {sorted(probes.statuses[name])}, not 503")
    assert not problems, (problems, report.line())
