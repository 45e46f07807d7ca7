"""Power loss: every process of ``make run`` SIGKILLed at once, then one ``make run``.

From a clone of the committed tree (its ``.venv`` a link to this one, so nothing
is installed again), ``make run`` starts the whole stack: embedded PostgreSQL and
Redis, web, two partition workers (``WORKERS=2``, named ``partitions0@`` and
``partitions1@``), history listener, beat and Flower.  Mid-stream, with
a backlog of accepted jobs (the partition workers frozen for a moment), every
process of the stack is stopped and SIGKILLed at once, by pid, as a power cut
would.  The pid in the stale ``postmaster.pid`` is then given to a live stranger
(what a reboot does).  One ``make run`` must bring the stack back; a second one on
the same folder says one is running and starts nothing; every job answered 202
before the cut is applied exactly once, and every balance, stock, coupon count
and order history adds up exactly.  Ctrl-C then stops it all.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from shared.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from shared.processes import cmdline, descendants, is_alive
from tests.faults.harness import (
    ADMIN_TOKEN,
    Ledger,
    Load,
    Rig,
    open_shop,
    settle_and_check,
    wait_until,
    warm_up,
)
from tests.stack import ROOT, Stack

pytestmark = pytest.mark.faults

# make's own variables of the make that runs this suite; the clone's make is not its child.
_NOT_INHERITED = ("DATABASE_URL", "REDIS_URL", "MAKEFLAGS", "MAKELEVEL", "MFLAGS")


def clone_of_this_tree(tmp_path: Path) -> Path:
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=120)
    (clone / ".venv").symlink_to(ROOT / ".venv")
    (clone / "logs").mkdir()
    return clone


class MakeRun:
    """``make run`` in ``clone``, in a session of its own (as in its own terminal)."""

    def __init__(self, clone: Path, env: dict[str, str], name: str) -> None:
        self.log_path = clone / "logs" / f"{name}.log"
        # -o: the venv is this checkout's, already installed; do not reinstall it here.
        self.proc = subprocess.Popen(
            ["make", "--no-print-directory", "-o", ".venv/.installed", "run"],
            cwd=clone,
            env=env,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pids(self) -> list[int]:
        return descendants(self.proc.pid)

    def power_loss(self) -> int:
        """Freeze every process of the stack, then SIGKILL them all; returns how many."""
        frozen: set[int] = set()
        while True:  # a process forked meanwhile is frozen too
            new = set(self.pids()) - frozen
            if not new:
                break
            for pid in new:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
            frozen |= new
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(30)
        wait_until(lambda: not any(is_alive(p) for p in frozen), 30, "every process dead")
        return len(frozen)

    def interrupt(self, timeout: float = 90) -> int:
        """Ctrl-C: SIGINT to the terminal's process group; returns make's exit code."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGINT)
        return self.proc.wait(timeout)

    def kill_all(self) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def rig_of(clone: Path, port: int) -> Rig:
    """The harness's view of the clone's stack: its servers by the ports under .run/."""
    run = clone / ".run"
    pg = EmbeddedPostgres(run / "pgdata", port=int((run / "pg.port").read_text()))
    rd = EmbeddedRedis(run / "redis", port=int((run / "redis.port").read_text()))
    stack = Stack(pg.url, rd.url, clone / "logs", admin_token=ADMIN_TOKEN, port=port)
    return Rig(clone, pg, rd, stack)


def ready(base_url: str) -> bool:
    try:
        return requests.get(base_url + "/readyz", timeout=3).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture
def runs() -> Iterator[list[MakeRun]]:
    started: list[MakeRun] = []
    yield started
    for run in started:
        run.kill_all()  # only what a failing test left running


def test_power_loss_then_one_make_run_applies_every_accepted_job_once(
    tmp_path: Path, runs: list[MakeRun]
) -> None:
    clone = clone_of_this_tree(tmp_path)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    env.update(
        PORT=str(port),
        FLOWER_PORT=str(free_port()),
        HOST="127.0.0.1",
        ADMIN_TOKEN=ADMIN_TOKEN,
        APP_ENV="test",
        RATE_LIMIT="off",
        SWEEP_AFTER_SECONDS="3",
        SWEEP_INTERVAL_SECONDS="1",
        WORKERS="2",  # make run WORKERS=2: two partition workers, named apart
        PYTHONPATH=str(clone),  # the clone's code, not this checkout's (same venv)
        PYTHONUNBUFFERED="1",
    )
    where = subprocess.run(
        [sys.executable, "-c", "import shared, web, workers; print(shared.__file__)"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.startswith(str(clone)), where.stdout

    first = MakeRun(clone, env, "make-run-1")
    runs.append(first)
    base_url = f"http://127.0.0.1:{port}"
    wait_until(lambda: ready(base_url), 180, f"make run serves\n{first.output[-3000:]}")
    for n in (0, 1):
        wait_until(lambda n=n: f"partitions{n}@" in first.output, 60, f"worker {n} named")
    rig = rig_of(clone, port)
    shop = open_shop(rig)
    ledger = Ledger()
    load = Load(rig, shop, ledger, seed=10)
    stranger: subprocess.Popen[bytes] | None = None
    try:
        warm_up(rig, load)
        stream = load.stream(400, rate=80)
        stream.wait_sent(120)
        # A backlog at the cut: the partition workers stop applying for a moment.
        workers = [p for p in first.pids() if "workers.boot" in " ".join(cmdline(p) or [])]
        assert len(workers) == 2, first.output[-3000:]
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        stream.wait_sent(200)
        pending_at_cut = rig.query("SELECT count(*) FROM jobs WHERE status = 'PENDING'")[0][0]
        killed = first.power_loss()
        accepted_before_cut = len(ledger.accepted())
        stream.join()  # what is left of it finds nobody listening
        assert pending_at_cut > 0
        assert (clone / ".run" / "pgdata" / "postmaster.pid").exists()
        assert (clone / ".run" / "supervisor.json").exists()

        # The kernel gives the dead postmaster's pid to another process.
        stranger = subprocess.Popen(["sleep", "600"])
        pid_file = clone / ".run" / "pgdata" / "postmaster.pid"
        lines = pid_file.read_text().splitlines(keepends=True)
        with pid_file.open("r+") as out:
            out.write("".join([f"{stranger.pid}\n", *lines[1:]]))
            out.truncate()

        second = MakeRun(clone, env, "make-run-2")
        runs.append(second)
        wait_until(lambda: ready(base_url), 180, f"make run after the cut\n{second.output[-3000:]}")
        restarted = time.monotonic()
        assert stranger.poll() is None  # left alone
        assert f"stale {pid_file.resolve()} (pid {stranger.pid} is no PostgreSQL" in second.output

        # A second `make run` on the same folder starts nothing.
        third = MakeRun(clone, env | {"PORT": str(free_port())}, "make-run-3")
        assert third.proc.wait(60) != 0
        assert "already running on .run" in third.output, third.output
        assert "started with pid" not in third.output
        assert ready(base_url)

        rig = rig_of(clone, port)
        after = load.run(60, threads=4)
        assert all(a.status == 202 for a in after), [(a.status, a.code) for a in after]
        report = settle_and_check(
            rig,
            shop,
            ledger,
            "power loss, one make run",
            recovered_at=restarted,
            no_answer_ok=True,
            notes={
                "processes_killed": killed,
                "accepted_before_cut": accepted_before_cut,
                "pending_at_cut": pending_at_cut,
            },
        )
    finally:
        load.close()
        if stranger is not None:
            stranger.kill()
            stranger.wait()
    assert not report.problems, report.line()

    assert second.interrupt() == -signal.SIGINT  # make ends as Ctrl-C asked
    assert not second.pids()
    assert not (clone / ".run" / "pgdata" / "postmaster.pid").exists()  # a clean stop
    assert "stopping" in second.output
