"""Gray-failure tools for the fault tests: freezing process trees, finding the drainer
that holds a partition, collecting job notifications, and network namespaces whose
link can be blackholed (issue 16).

Only what the tests create is touched: the processes of their own stack and servers,
and a network namespace with a veth pair in a private /30 of their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from redis import Redis

from shared.config import REDIS_DB_BROKER, redis_url_for
from shared.jobs import FINISHED_CHANNEL_PREFIX
from tests.faults.harness import Load, Rig, drains_of

# ---- processes -----------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (PostgreSQL's backends are sessions of their own,
    so a process group does not reach them)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(parents.get(current, []))
    return tree


def signal_tree(pid: int, sig: int) -> None:
    for member in process_tree(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, sig)


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[float]:
    """SIGSTOP ``pid`` and its descendants for the block (SIGCONT after, whatever
    happens); yields the ``time.monotonic()`` of the freeze."""
    signal_tree(pid, signal.SIGSTOP)
    try:
        yield time.monotonic()
    finally:
        signal_tree(pid, signal.SIGCONT)


def local_ports(pid: int) -> set[int]:
    """Local TCP ports of ``pid``'s sockets (its connections to PostgreSQL among them)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                parts = line.split()
                if parts[9] in inodes:
                    ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


# The backends holding a partition's advisory lock (a drain transaction), with their client.
_DRAINERS = """
    SELECT a.pid, host(a.client_addr), a.client_port
    FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory' AND l.granted AND a.client_port IS NOT NULL
"""


def drainer_backends(rig: Rig) -> list[tuple[int, str, int]]:
    return [(int(r[0]), str(r[1]), int(r[2])) for r in rig.query(_DRAINERS)]


def holds_partition(rig: Rig, backend: int) -> bool:
    return any(b == backend for b, _, _ in drainer_backends(rig))


def backend_gone(rig: Rig, backend: int) -> bool:
    return not rig.query("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (backend,))


@dataclass
class Drainer:
    key: str  # the stack's process key
    pid: int
    backend: int  # its PostgreSQL backend holding a partition lock


@contextlib.contextmanager
def drain_waiting_on_a_row(
    rig: Rig, keys: list[str], product_id: int, timeout: float = 20
) -> Iterator[Drainer]:
    """A worker of ``keys`` caught inside a drain transaction, for the block: the test
    holds product ``product_id``'s row (``FOR UPDATE``, in a transaction of its own) until
    a drain that locks it waits on it, holding its partitions' advisory locks.  As the
    block ends the row is let go: the drain's statement goes on (a frozen or cut-off
    worker's transaction stays open, holding its partitions).

    Deterministic, unlike catching a drain of a few jobs in its milliseconds."""
    with psycopg.connect(rig.pg.url, connect_timeout=5) as blocker:
        blocker.execute("SELECT 1 FROM products WHERE id = %s FOR UPDATE", (product_id,))
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                for backend, port in _drainers_waiting_on(rig, blocker.info.backend_pid):
                    for key in keys:
                        proc = rig.stack.procs.get(key)
                        if proc is not None and port in local_ports(proc.pid):
                            yield Drainer(key, proc.pid, backend)
                            return
                time.sleep(0.01)
            raise AssertionError(f"no drain of {keys} waited on product {product_id}")
        finally:
            blocker.rollback()


def _drainers_waiting_on(rig: Rig, blocker: int) -> list[tuple[int, int]]:
    """(backend, client port) of the drain transactions blocked by backend ``blocker``."""
    rows = rig.query(
        f"{_DRAINERS} AND %s = ANY(pg_blocking_pids(a.pid))",
        (blocker,),
    )
    return [(int(r[0]), int(r[2])) for r in rows]


# ---- notifications -----------------------------------------------------------------------


class Notifications:
    """Every job outcome announced on the rig's Redis (to any web process's
    ``jobs:finished:<token>`` channel: jobs someone waits for), per job id, collected by a
    thread: a job announced twice, or with an outcome its row does not hold, is work
    reported that did not commit."""

    def __init__(self, rig: Rig) -> None:
        self._client = Redis.from_url(
            redis_url_for(rig.redis.url, REDIS_DB_BROKER), socket_timeout=5
        )
        # (channel, job id) -> the documents announced: one each, a process is told once.
        self.documents: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            try:
                pubsub.psubscribe(FINISHED_CHANNEL_PREFIX + "*")
                self._ready.set()
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None and message["type"] == "pmessage":
                        channel = message["channel"].decode()
                        for job_id, doc in json.loads(message["data"]).items():
                            self.documents.setdefault((channel, job_id), []).append(doc)
            except Exception as exc:  # Redis frozen by the test: notifications may be missed
                self.errors.append(repr(exc))
                time.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._client.close()

    def problems(self, rig: Rig) -> list[str]:
        """Jobs announced more than once, or with another outcome than their row's."""
        rows = {
            r[0]: (r[1], r[2])
            for r in rig.query(
                "SELECT id::text, status, result FROM jobs WHERE status <> 'PENDING'"
            )
        }
        found = []
        for (channel, job_id), docs in self.documents.items():
            if len(docs) > 1:
                found.append(f"job {job_id} announced {len(docs)} times on {channel}")
            row = rows.get(job_id)
            if row is None or (docs[0]["status"], docs[0]["result"]) != row:
                found.append(f"job {job_id} announced {docs[0]['status']}, row says {row}")
        return found


class Waiting:
    """Job POSTs with ``Prefer: wait=2`` sent one after another beside a stream (a thread),
    so that outcomes are announced to web (only jobs someone waits for are)."""

    def __init__(self, load: Load) -> None:
        self._load = load
        self._stop = threading.Event()
        self.sent = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._load.send(self._load.requests(1)[0], headers={"Prefer": "wait=2"})
            self.sent += 1
            self._stop.wait(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(40)


# ---- network namespaces ------------------------------------------------------------------


class NamespaceUnavailable(RuntimeError):
    """Network namespaces (or nft) cannot be used here; the message has the exact error."""


def _run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise NamespaceUnavailable(
            f"{' '.join(command)}: exit {done.returncode}: {done.stderr.strip()}"
        )


@dataclass
class Namespace:
    """A network namespace joined to this one by a veth pair in a private /30.

    The host side has ``host_address`` (where the test's servers listen too), the
    namespace side ``address``.  ``cut()`` blackholes the namespace's traffic with the
    host side (nft DROP in both directions: packets vanish, no reset), optionally only
    to and from one port of the host; ``heal()`` lifts it.
    """

    name: str
    host_address: str
    address: str
    cidr: str
    host_link: str
    cut_at: float | None = None
    cuts: list[str] = field(default_factory=list)

    @property
    def exec(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def nft(self, *args: str) -> None:
        _run(*self.exec, "nft", *args)

    def cut(self, port: int | None = None) -> None:
        """Drop every packet between the namespace and ``host_address`` (``port``: only
        the connections to that port of the host)."""
        self.nft("add", "table", "inet", "cut")
        self.nft("add", "chain", "inet", "cut", "out", "{ type filter hook output priority 0; }")
        self.nft("add", "chain", "inet", "cut", "in", "{ type filter hook input priority 0; }")
        out = ["ip", "daddr", self.host_address]
        into = ["ip", "saddr", self.host_address]
        if port is not None:
            out += ["tcp", "dport", str(port)]
            into += ["tcp", "sport", str(port)]
        self.nft("add", "rule", "inet", "cut", "out", *out, "drop")
        self.nft("add", "rule", "inet", "cut", "in", *into, "drop")
        self.cut_at = time.monotonic()

    def heal(self) -> None:
        with contextlib.suppress(NamespaceUnavailable):
            self.nft("delete", "table", "inet", "cut")
        self.cut_at = None


def tools_missing() -> list[str]:
    return [tool for tool in ("ip", "nft") if shutil.which(tool) is None]


@contextlib.contextmanager
def namespace(tag: str) -> Iterator[Namespace]:
    """A fresh namespace and veth pair (10.213.N.0/30, N free); removed after the block.

    Raises ``NamespaceUnavailable`` with the exact error when they cannot be made.
    """
    missing = tools_missing()
    if missing:
        raise NamespaceUnavailable(f"missing tools: {missing} (make test installs them)")
    taken = subprocess.run(["ip", "-4", "addr"], check=False, capture_output=True, text=True).stdout
    n = next(n for n in random.sample(range(1, 255), 254) if f"10.213.{n}." not in taken)
    name = f"shop-{tag}-{n}"[:15]
    host_link, ns_link = f"vg{n}h{os.getpid() % 1000}", f"vg{n}n{os.getpid() % 1000}"
    ns = Namespace(name, f"10.213.{n}.1", f"10.213.{n}.2", f"10.213.{n}.0/30", host_link)
    created = False
    try:
        _run("ip", "netns", "add", name)
        created = True
        _run("ip", "link", "add", host_link, "type", "veth", "peer", "name", ns_link)
        _run("ip", "link", "set", ns_link, "netns", name)
        _run("ip", "addr", "add", f"{ns.host_address}/30", "dev", host_link)
        _run("ip", "link", "set", host_link, "up")
        _run("ip", "-n", name, "addr", "add", f"{ns.address}/30", "dev", ns_link)
        _run("ip", "-n", name, "link", "set", ns_link, "up")
        _run("ip", "-n", name, "link", "set", "lo", "up")
        yield ns
    finally:
        if created:
            with contextlib.suppress(NamespaceUnavailable):
                ns.heal()
            subprocess.run(["ip", "link", "del", host_link], capture_output=True, check=False)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def wait_drains(host: str, port: int, timeout: float = 30) -> float:
    """The worker's drain count, once its metrics answer (fails past ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        count = drains_of(host, port)
        if count is not None:
            return count
        time.sleep(0.2)
    raise AssertionError(f"no metrics from {host}:{port} within {timeout}s")
