"""The run command's supervisor, on stand-in processes (``tests.faults.dummy_process``).

A crashing process is restarted with a growing back-off while the others keep
running; the supervisor stops everything on SIGTERM only; its children die when
it is SIGKILLed; a second supervisor on the same run folder refuses to start;
process groups left by a previous run are stopped first (and a reused pid is not).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.processes import AlreadyRunning, exclusive, group_members, is_alive, start_ticks
from shared.supervisor import stop_leftovers
from tests.stack import ROOT

pytestmark = pytest.mark.faults

DUMMY = f"{sys.executable} -m tests.faults.dummy_process"


class Supervised:
    """``python -m shared.supervisor`` on a Procfile of ours, its output in a file."""

    def __init__(self, tmp: Path, procfile: str, *args: str) -> None:
        self.run_dir = tmp / "run"
        self.log_path = tmp / f"supervisor-{time.monotonic_ns()}.log"
        (tmp / "Procfile").write_text(procfile)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "shared.supervisor",
                "-f",
                str(tmp / "Procfile"),
                "--run-dir",
                str(self.run_dir),
                "--grace",
                "5",
                *args,
            ],
            cwd=ROOT,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 30) -> list[re.Match[str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = list(re.finditer(pattern, self.output))
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"{count} x {pattern!r} not seen in {timeout}s:\n{self.output}")

    def children(self) -> dict[str, int]:
        state = json.loads((self.run_dir / "supervisor.json").read_text())
        return {child["name"]: child["pid"] for child in state["children"]}

    def close(self) -> None:
        """Kill the supervisor and, should a test have failed, whatever it left."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        stop_leftovers(self.run_dir, lambda _line: None)  # checks each pid is still ours


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[list[Supervised]]:
    started: list[Supervised] = []
    yield started
    for s in started:
        s.close()


def wait_dead(pids: list[int], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while any(is_alive(p) for p in pids):
        assert time.monotonic() < deadline, [p for p in pids if is_alive(p)]
        time.sleep(0.05)


def test_a_crashing_process_is_restarted_with_backoff_while_the_others_serve(
    tmp_path: Path, supervised: list[Supervised]
) -> None:
    s = Supervised(tmp_path, f"serve: {DUMMY} serve\ncrash: {DUMMY} crash\n", "--scale", "serve=2")
    supervised.append(s)
    ready = s.wait_for(r"serve\.(\d) *\| ready (\S+) (\d+)", count=2)
    assert sorted(m.group(2) for m in ready) == ["0", "1"]  # WORKER_ID per instance
    serving = sorted(int(m.group(3)) for m in ready)
    delays = [
        float(m.group(1))
        for m in s.wait_for(r"crash\.1 \(pid \d+\) exited with code 3 .*restarting in (\d+)s", 4)
    ]
    assert delays[:4] == [1, 2, 4, 8]  # doubled for each exit soon after its start
    assert len(s.wait_for(r"crash\.1 restarted with pid")) >= 3
    assert sorted(s.children()[name] for name in ("serve.1", "serve.2")) == serving
    assert all(is_alive(p) for p in serving)

    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(30) == 0
    assert s.output.count(" | bye") == 2  # each stopped on SIGTERM, not killed
    wait_dead(serving, timeout=1)
    assert not (s.run_dir / "supervisor.json").exists()


def test_children_die_with_a_supervisor_killed_by_sigkill(
    tmp_path: Path, supervised: list[Supervised]
) -> None:
    s = Supervised(tmp_path, f"serve: {DUMMY} serve\n", "--scale", "serve=3")
    supervised.append(s)
    s.wait_for(r"\| ready", count=3)
    children = list(s.children().values())
    assert len(children) == 3
    s.proc.kill()
    s.proc.wait()
    wait_dead(children)
    assert all(not group_members(pid) for pid in children)


def test_a_second_supervisor_on_the_same_folder_refuses_to_start(
    tmp_path: Path, supervised: list[Supervised]
) -> None:
    first = Supervised(tmp_path, f"serve: {DUMMY} serve\n")
    supervised.append(first)
    first.wait_for(r"\| ready")
    before = first.children()
    second = Supervised(tmp_path, f"serve: {DUMMY} serve\n")
    supervised.append(second)
    assert second.proc.wait(30) == 1
    assert f"already running on {first.run_dir} (pid {first.proc.pid})" in second.output
    assert "started" not in second.output
    assert first.proc.poll() is None
    assert first.children() == before
    assert all(is_alive(pid) for pid in before.values())


def test_process_groups_left_by_a_previous_run_are_stopped_first(
    tmp_path: Path, supervised: list[Supervised]
) -> None:
    def leftover(mode: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.dummy_process", mode],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(b"ready")  # its SIGTERM handling is set
        return proc

    survivor, stubborn, stranger = leftover("serve"), leftover("stubborn"), leftover("serve")
    try:
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        records = [
            {"name": "web.1", "pid": survivor.pid, "start": start_ticks(survivor.pid)},
            {"name": "beat.1", "pid": stubborn.pid, "start": start_ticks(stubborn.pid)},
            # The same pid, a different start: the number was given to another process.
            {"name": "worker.1", "pid": stranger.pid, "start": start_ticks(stranger.pid) - 1},
        ]
        (run_dir / "supervisor.json").write_text(json.dumps({"children": records}))
        s = Supervised(tmp_path, f"serve: {DUMMY} serve\n")
        supervised.append(s)
        s.wait_for(r"\| ready", timeout=40)
        assert survivor.wait(5) == 0  # stopped by SIGTERM
        assert stubborn.wait(5) == -signal.SIGKILL  # it ignored SIGTERM
        assert stranger.poll() is None
        assert "web.1 (process group" in s.output
        assert "worker.1 (process group" not in s.output
    finally:
        for proc in (survivor, stubborn, stranger):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_make_run_refuses_a_run_folder_already_in_use(tmp_path: Path) -> None:
    with exclusive(tmp_path / "run.lock", "make run"):
        answer = subprocess.run(
            [
                sys.executable,
                "-m",
                "shared.embedded",
                "up",
                "--run-dir",
                str(tmp_path),
                "--",
                "true",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert answer.returncode == 1
    assert f"already running on {tmp_path} (pid {os.getpid()})" in answer.stderr
    assert not (tmp_path / "pgdata").exists()  # nothing half-started


def test_a_run_folder_lock_has_one_holder_and_dies_with_it(tmp_path: Path) -> None:
    lock = tmp_path / "run.lock"
    with (
        exclusive(lock, "make run"),
        pytest.raises(AlreadyRunning, match=f"pid {os.getpid()}"),
        exclusive(lock, "make run"),
    ):
        pass
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from shared.processes import exclusive\n"
            f"with exclusive(__import__('pathlib').Path({str(lock)!r}), 'x'):\n"
            "    print('held', flush=True); time.sleep(600)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"held\n"
        with pytest.raises(AlreadyRunning, match=f"pid {holder.pid}"), exclusive(lock, "x"):
            pass
        holder.kill()  # as in a power loss: no chance to clean up
        holder.wait()
        with exclusive(lock, "x"):
            assert lock.read_text() == f"{os.getpid()}\n"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
