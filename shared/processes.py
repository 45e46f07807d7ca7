"""What the launchers (``shared.embedded``, ``shared.supervisor``) need from Linux.

* ``die_with_parent(sig)``: a ``preexec_fn`` that asks the kernel to send ``sig``
  to the child when its parent dies, even by SIGKILL (``PR_SET_PDEATHSIG``), so
  that a killed run command leaves no orphan holding ports or data folders.
  The signal follows the *thread* that forked the child: spawn from a thread
  that lives as long as the child should (the launchers use their main thread).
  A ``preexec_fn`` is unsafe with threads when it takes a lock another thread may
  hold at the fork (ruff PLW1509); this one only calls ``prctl`` and ``getppid``.
* ``start_ticks``, ``cmdline``, ``cwd``, ``group_members``: what a pid really is,
  read from ``/proc``.  After a power loss every pid in a pid file is stale, and
  the kernel may have given the number to another process: a pid is only "that
  server" if its command line (or working folder) says so and, where recorded,
  it started when it did.
* ``exclusive(path, what)``: one holder of a run folder at a time.  ``flock`` dies
  with its process, so a lock never goes stale, not even after a power loss.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_PROC = Path("/proc")


class AlreadyRunning(RuntimeError):
    """Another process holds the run folder's lock; the message says which and how to stop it."""


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn``: the child gets ``sig`` when the process spawning it dies.

    ``None`` off Linux (no such call).  If the parent died between ``fork`` and the
    call, the child signals itself: the kernel would not.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before the fork
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` from field 3 on (the command name may hold spaces and parens)."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), ``None`` if there is no such process.

    With the pid it names one process for good: a reused pid starts later.
    """
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def is_alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def cmdline(pid: int) -> list[str] | None:
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def cwd(pid: int) -> Path | None:
    """The working folder of ``pid``; ``None`` if gone or not ours to read."""
    try:
        return Path(os.readlink(_PROC / str(pid) / "cwd"))
    except OSError:
        return None


def group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid``.

    While any member lives, the kernel gives the number ``pgid`` to no new process,
    so members found here belong to the group that was started under it.
    """
    members = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` in the parent tree, ``root`` included."""
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields and fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if is_alive(pid):
            found.append(pid)
        todo.extend(children.get(pid, []))
    return found


@contextlib.contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold ``path``'s lock for the block, or raise ``AlreadyRunning`` naming the holder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by children (PEP 446)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise AlreadyRunning(
            f"{what} is already running on {path.parent} (pid {holder}); "
            f"stop it first (Ctrl-C in its terminal, or kill {holder})"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays, harmless
