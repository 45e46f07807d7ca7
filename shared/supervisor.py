"""The run command's supervisor: every Procfile process, kept running, never orphaned.

``python -m shared.supervisor [-f Procfile] [--scale worker=3] [--run-dir .run]``
starts each Procfile process (honcho parses the file and formats the output, as
``honcho start`` would) and then:

* restarts a process that exits unexpectedly, after a back-off (1 s, doubled for
  each exit within ``STABLE_SECONDS`` of its start, at most ``MAX_BACKOFF_SECONDS``),
  logging the exit and the restart; the other processes keep serving;
* stops everything only on Ctrl-C or SIGTERM: SIGTERM to each process group, then
  SIGKILL after ``--grace`` seconds (another Ctrl-C a second later kills at once);
* leaves no orphans: each child gets SIGTERM when the supervisor dies, even by
  SIGKILL (``PR_SET_PDEATHSIG``), and the process groups it starts are recorded in
  ``<run-dir>/supervisor.json``, so the next start stops whatever survived (a child
  that forked away from that signal) before starting anew;
* runs once per run folder: a second start says that one is running and exits
  (``<run-dir>/supervisor.lock``).

Every child gets ``PROMETHEUS_MULTIPROC_DIR`` (``<run-dir>/metrics`` unless set):
the folder where each process writes its metrics and from which one scrape of
web's ``/metrics`` adds them all up; the files of a previous run are removed first.

Instance ``i`` (from 0) of a process type runs with ``WORKER_ID=i``, so that
``--scale worker=K`` gives the partition workers distinct Celery node names
(``partitions<i>@host``).  Each command runs as ``sh -c 'exec <command>'`` in a
session of its own (so the terminal's Ctrl-C reaches the supervisor alone, which
then stops the children in order); a command using shell operators (``;``, ``&&``,
pipes) runs without the ``exec``, and its shell is the child.

This module is a process launcher: it hands its environment to the children.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from honcho.colour import get_colours
from honcho.environ import parse_procfile
from honcho.printer import Message, Printer

from shared.processes import (
    AlreadyRunning,
    die_with_parent,
    exclusive,
    group_members,
    start_ticks,
)

STABLE_SECONDS = 10.0  # a process that ran this long starts its back-off from scratch
FIRST_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 30.0
DEFAULT_GRACE_SECONDS = 20.0  # above gunicorn's --graceful-timeout and a drain's length
LEFTOVER_GRACE_SECONDS = 10.0

_SHELL_OPERATORS = re.compile(r"[;&|`\n]|\$\(")
_ASSIGNMENTS = re.compile(r"^(\s*[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*")


def shell_command(command: str) -> list[str]:
    """``sh -c`` running ``command`` with ``exec``, so the child *is* the program: it,
    not a shell, gets the parent-death signal (dash forks a simple ``-c`` command)."""
    if _SHELL_OPERATORS.search(command):
        return ["/bin/sh", "-c", command]
    lead = _ASSIGNMENTS.match(command)
    cut = lead.end() if lead else 0
    return ["/bin/sh", "-c", f"{command[:cut]}exec {command[cut:]}"]


def backoff_seconds(quick_exits: int) -> float:
    """Delay before the next start, after ``quick_exits`` exits in a row within
    ``STABLE_SECONDS`` of a start (0 after a process that had been running fine):
    1 s, then 1, 2, 4 ... up to ``MAX_BACKOFF_SECONDS``."""
    doublings = max(quick_exits - 1, 0)
    return float(min(FIRST_BACKOFF_SECONDS * 2**doublings, MAX_BACKOFF_SECONDS))


@dataclass
class Slot:
    """One process of the Procfile (``worker.2``) and its current incarnation."""

    name: str
    kind: str
    index: int
    command: str
    colour: str | None
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    quick_exits: int = 0
    due: float | None = 0.0  # monotonic time of the next start; None while it runs
    reader: threading.Thread | None = None
    starts: int = field(default=0)


def expand(procfile: dict[str, str], scale: dict[str, int]) -> list[Slot]:
    """The Procfile's process types, each ``scale``-fold (default 1), named ``type.N``."""
    unknown = set(scale) - set(procfile)
    if unknown:
        raise SystemExit(f"--scale names no Procfile process: {', '.join(sorted(unknown))}")
    colours = get_colours()
    return [
        Slot(f"{kind}.{i + 1}", kind, i, command, next(colours))
        for kind, command in procfile.items()
        for i in range(scale.get(kind, 1))
    ]


class Supervisor:
    def __init__(
        self,
        slots: list[Slot],
        env: dict[str, str],
        run_dir: Path,
        *,
        grace: float = DEFAULT_GRACE_SECONDS,
        output: IO[str] | None = None,
    ) -> None:
        self.slots = slots
        self.env = env
        self.run_dir = run_dir
        self.grace = grace
        width = max(len(s.name) for s in [*slots, Slot("system", "", 0, "", None)])
        self._printer = Printer(output=output or sys.stdout, width=width)
        self._print_lock = threading.Lock()
        self._stop_requested: float | None = None
        self._kill_requested = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # ---- output ---------------------------------------------------------------

    def log(self, text: str, name: str = "system", colour: str | None = None) -> None:
        message = Message("line", text, dt.datetime.now(dt.UTC).astimezone(), name, colour)
        with self._print_lock:
            self._printer.write(message)

    def _pump(self, slot: Slot, stream: IO[bytes]) -> None:
        for line in iter(stream.readline, b""):
            with contextlib.suppress(ValueError, OSError):  # our stdout gone: keep draining
                self.log(line.decode("utf-8", "replace").rstrip("\n"), slot.name, slot.colour)
        stream.close()

    # ---- signals --------------------------------------------------------------

    def _on_stop(self, signum: int, _frame: FrameType | None) -> None:
        now = time.monotonic()
        if self._stop_requested is None:
            self._stop_requested = now
        elif now - self._stop_requested > 1.0:
            # A second Ctrl-C; the first one may have reached us twice (terminal and parent).
            self._kill_requested = True

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGCHLD, lambda _s, _f: None)  # only to wake the loop

    def _sleep(self, seconds: float) -> None:
        """Wait up to ``seconds``; any signal (a child's exit, Ctrl-C) ends the wait early."""
        with contextlib.suppress(InterruptedError):
            select.select([self._wake_r], [], [], max(seconds, 0.0))
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 512):
                pass

    # ---- children ---------------------------------------------------------------

    def _start(self, slot: Slot) -> None:
        env = dict(self.env, WORKER_ID=str(slot.index))
        proc = subprocess.Popen(
            shell_command(slot.command),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),  # noqa: PLW1509 (see shared.processes)
        )
        slot.proc, slot.started_at, slot.due = proc, time.monotonic(), None
        slot.starts += 1
        assert proc.stdout is not None
        slot.reader = threading.Thread(
            target=self._pump, args=(slot, proc.stdout), name=f"out-{slot.name}", daemon=True
        )
        slot.reader.start()
        verb = "started" if slot.starts == 1 else "restarted"
        self.log(f"{slot.name} {verb} with pid {proc.pid}")
        self._record()

    def _reap(self) -> None:
        for slot in self.slots:
            proc = slot.proc
            if proc is None or proc.poll() is None:
                continue
            ran = time.monotonic() - slot.started_at
            slot.quick_exits = slot.quick_exits + 1 if ran < STABLE_SECONDS else 0
            delay = backoff_seconds(slot.quick_exits)
            code = proc.returncode
            how = f"signal {-code}" if code < 0 else f"code {code}"
            self.log(
                f"{slot.name} (pid {proc.pid}) exited with {how} after {ran:.1f}s; "
                f"restarting in {delay:.0f}s"
            )
            if slot.reader is not None:
                slot.reader.join(1.0)
            slot.proc, slot.due = None, time.monotonic() + delay
        self._record()

    def _record(self) -> None:
        """The process groups we run, for the next start should we die without stopping them."""
        children = [
            {"name": s.name, "pid": s.proc.pid, "start": start_ticks(s.proc.pid)}
            for s in self.slots
            if s.proc is not None
        ]
        state = {"supervisor": os.getpid(), "children": children}
        path = self.run_dir / "supervisor.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(path)

    # ---- the loop ---------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        for slot in self.slots:
            if self._stop_requested is None:
                self._start(slot)
        while self._stop_requested is None:
            now = time.monotonic()
            waiting = [s.due for s in self.slots if s.due is not None]
            self._sleep(min([*waiting, now + 5.0]) - now)
            self._reap()
            for slot in self.slots:
                due = slot.due
                if self._stop_requested is None and due is not None and due <= time.monotonic():
                    self._start(slot)
        return self._stop_all()

    def _stop_all(self) -> int:
        running = [
            (slot, slot.proc)
            for slot in self.slots
            if slot.proc is not None and slot.proc.poll() is None
        ]
        self.log(f"stopping {len(running)} processes (SIGKILL after {self.grace:.0f}s)")
        for _, proc in running:
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and not self._kill_requested:
            if all(proc.poll() is not None for _, proc in running):
                break
            self._sleep(deadline - time.monotonic())
        # Whatever is left in a group (a gunicorn worker, a shell's child) goes too.
        for slot, proc in running:
            if group_members(proc.pid):
                self.log(f"{slot.name} (pid {proc.pid}) did not stop in time: SIGKILL")
                _signal_group(proc.pid, signal.SIGKILL)
        for slot, proc in running:
            proc.wait()
            self.log(f"{slot.name} stopped ({proc.returncode})")
            if slot.reader is not None:
                slot.reader.join(1.0)
        (self.run_dir / "supervisor.json").unlink(missing_ok=True)
        return 0


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop_leftovers(run_dir: Path, log: Any) -> None:
    """Stop the process groups a previous supervisor recorded, if any still live.

    A group whose leader lives but started at another time is not ours (its pid was
    reused after the whole group died) and is left alone.
    """
    path = run_dir / "supervisor.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    groups = []
    for child in state.get("children", []):
        pid = int(child["pid"])
        members = group_members(pid)
        if not members or (pid in members and start_ticks(pid) != child.get("start")):
            continue
        log(f"{child['name']} (process group {pid}) survived the last run: stopping it")
        _signal_group(pid, signal.SIGTERM)
        groups.append(pid)
    deadline = time.monotonic() + LEFTOVER_GRACE_SECONDS
    while groups and time.monotonic() < deadline and any(group_members(g) for g in groups):
        time.sleep(0.1)  # bounded by the deadline above
    for pgid in groups:
        if group_members(pgid):
            _signal_group(pgid, signal.SIGKILL)
    path.unlink(missing_ok=True)


def prepare_metrics_dir(env: dict[str, str], run_dir: Path) -> Path:
    """Set ``PROMETHEUS_MULTIPROC_DIR`` in the children's ``env`` (``<run-dir>/metrics``
    unless the operator set one) and empty it of a previous run's files: prometheus_client
    asks for a folder wiped between runs (stale files would add old counts to the sums,
    or have a new process with a reused pid carry on from a dead one's values)."""
    folder = Path(env.get("PROMETHEUS_MULTIPROC_DIR") or run_dir / "metrics").absolute()
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink(missing_ok=True)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    return folder


def _scale(values: Iterable[str]) -> dict[str, int]:
    scale: dict[str, int] = {}
    for value in values:
        for part in value.split(","):
            kind, _, count = part.partition("=")
            if not count.isdigit() or int(count) < 1:
                raise SystemExit(f"--scale wants TYPE=N with N >= 1, not {part!r}")
            scale[kind.strip()] = int(count)
    return scale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.supervisor")
    parser.add_argument("-f", "--procfile", default="Procfile", type=Path)
    parser.add_argument(
        "--scale", action="append", default=[], help="TYPE=N (repeat, or comma-separate)"
    )
    parser.add_argument("--run-dir", default=".run", type=Path)
    parser.add_argument("--grace", default=DEFAULT_GRACE_SECONDS, type=float)
    args = parser.parse_args(argv)
    procfile = parse_procfile(args.procfile.read_text()).processes
    slots = expand(dict(procfile), _scale(args.scale))
    env = dict(os.environ)  # noqa: TID251 (launcher of child processes)
    supervisor = Supervisor(slots, env, args.run_dir, grace=args.grace)
    try:
        with exclusive(args.run_dir / "supervisor.lock", "a supervisor"):
            stop_leftovers(args.run_dir, supervisor.log)
            prepare_metrics_dir(env, args.run_dir)  # the survivors are gone: nothing writes
            return supervisor.run()
    except AlreadyRunning as exc:
        print(f"shared.supervisor: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
