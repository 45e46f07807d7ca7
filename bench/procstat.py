"""CPU time of process trees, read from ``/proc/<pid>/stat``.

A group (``web``, ``worker``, ``postgres``...) is one or more root pids; its CPU is
``utime + stime + cutime + cstime`` summed over every live process of each root's
tree, so gunicorn's workers and PostgreSQL's backends count, and so do children
that exited and were reaped inside the tree (their time moved to ``cutime``).
A process that exits between two samples without a parent in the tree loses
its time: the figures are a floor.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _read_all() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, cpu ticks of the process and its reaped children)."""
    table: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # The command name is in parentheses and may hold spaces: split after the last ')'.
        fields = raw[raw.rindex(")") + 2 :].split()
        ppid = int(fields[1])
        ticks = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        table[int(entry.name)] = (ppid, ticks)
    return table


def tree_ticks(table: dict[int, tuple[int, int]], roots: list[int]) -> int:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    seen: set[int] = set()
    stack = [r for r in roots if r in table]
    total = 0
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += table[pid][1]
        stack.extend(children.get(pid, ()))
    return total


@dataclass
class CpuMeter:
    """``start()`` then ``stop()``: CPU seconds per group over the interval.

    ``groups`` is called at each sample, since processes may be restarted in between:
    a root started meanwhile counts from zero; one that ended meanwhile is lost.
    """

    groups: Callable[[], dict[str, list[int]]]
    _before: dict[str, dict[int, int]] = field(default_factory=dict)

    def _sample(self) -> dict[str, dict[int, int]]:
        table = _read_all()
        return {
            name: {pid: tree_ticks(table, [pid]) for pid in pids}
            for name, pids in self.groups().items()
        }

    def start(self) -> None:
        self._before = self._sample()

    def stop(self) -> dict[str, float]:
        after = self._sample()
        out: dict[str, float] = {}
        for name, roots in after.items():
            before = self._before.get(name, {})
            ticks = sum(max(t - before.get(pid, 0), 0) for pid, t in roots.items())
            out[name] = ticks / TICK
        return out


def wait_idle(
    roots: list[int], *, below: float = 0.05, interval: float = 0.5, timeout: float = 60
) -> float:
    """Wait until the trees of ``roots`` use under ``below`` cores (workers done booting).

    gunicorn answers once its first worker is up while the others still import
    their app; a load started then would count (and compete with) their start-up.
    Returns the seconds waited.
    """
    started = time.monotonic()
    last = tree_ticks(_read_all(), roots)
    while time.monotonic() - started < timeout:
        time.sleep(interval)
        now = tree_ticks(_read_all(), roots)
        if (now - last) / TICK / interval < below:
            break
        last = now
    return time.monotonic() - started


def run_measured(
    command: list[str], env: dict[str, str], *, stderr_path: Path, cwd: Path | None = None
) -> tuple[str, float, int]:
    """Run ``command`` to its end: (stdout, CPU seconds of it and its children, exit code)."""
    with stderr_path.open("ab") as err:
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=err, env=env, cwd=cwd, text=True
        )
        assert proc.stdout is not None
        out = proc.stdout.read()
        return out, *wait_measured(proc)


def wait_measured(proc: subprocess.Popen[str]) -> tuple[float, int]:
    """Reap ``proc`` with wait4: (CPU seconds, exit code) from the kernel's own account."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime, proc.returncode
