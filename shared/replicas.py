"""Read replicas, and which of them may serve a read that tolerates a given lag.

A replica *covers* a moment S when every commit visible on the primary before S has
been replayed on it: a read there then reflects every job that SUCCEEDED before S.
The checker (``ReplicaSet.run``, a background thread of each web process; a greenlet
under gevent) measures it every ``REPLICA_CHECK_INTERVAL_MS``, never per request:

1. at S (this process's monotonic clock, read just before the query) it reads the
   primary's WAL insert position P: every commit visible before S has its commit
   record before P (inserted before it became visible, even with
   ``synchronous_commit = off``);
2. a moment later it reads each replica's replay position R
   (``pg_last_wal_replay_lsn()``); the replica covers the latest S whose P <= R.

A read that must reflect every commit older than ``max_lag`` seconds may use a
replica that is healthy and covers ``now - max_lag`` or later; ``pick`` takes those in
turn (round robin).  A replica that does not answer, is not a standby (promoted) or
follows another primary is skipped until a check finds it well again; meanwhile its
coverage only ages, so it drops out by itself when it stops replaying.  No replica
fits: the read goes to the primary, which is always correct.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

# The insert position of an idle primary whose last record ended exactly at a page's
# (a segment's) end is the first byte after the next page's header; a caught-up
# standby then reports the boundary itself as its replay position.
SHORT_PAGE_HEADER = 24  # SizeOfXLogShortPHD
LONG_PAGE_HEADER = 40  # SizeOfXLogLongPHD: the first page of a WAL segment

_PRIMARY_POSITION = text(
    "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint,"
    " current_setting('wal_block_size')::bigint,"
    " (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size')"
)
_REPLAY_POSITION = text(
    "SELECT pg_is_in_recovery(), pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::bigint"
)
_SYSTEM_ID = text("SELECT system_identifier FROM pg_control_system()")

# Enough samples to cover a replica up to this many checks behind.
_SAMPLES = 64


def end_of_wal(insert: int, block: int, segment: int) -> int:
    """The position a standby that has replayed everything up to ``insert`` reports."""
    if insert % segment == LONG_PAGE_HEADER:
        return insert - LONG_PAGE_HEADER
    if insert % block == SHORT_PAGE_HEADER:
        return insert - SHORT_PAGE_HEADER
    return insert


@dataclass
class Replica:
    name: str
    sessions: sessionmaker[Session]
    probe: Engine
    covered_at: float | None = None
    healthy: bool = False
    problem: str | None = "not checked yet"
    system_id: int | None = None


class ReplicaSet:
    """The replicas of one primary and how far each has replayed (see the module)."""

    def __init__(
        self,
        primary_probe: Engine,
        replicas: list[Replica],
        *,
        max_lag: float,
        interval: float,
        settle: float = 0.02,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.primary_probe = primary_probe
        self.replicas = replicas
        self.max_lag = max_lag
        self.interval = interval
        # A pause between the two reads, so that a replica streaming normally has
        # replayed the WAL of the primary's sample by the time it is asked.
        self._settle = settle
        self._clock = clock
        self._samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=_SAMPLES)
        self._system_id: int | None = None
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- choosing ----------------------------------------------------------------

    def pick(self, max_lag: float) -> tuple[Replica, float] | None:
        """A replica covering ``now - min(max_lag, REPLICA_MAX_LAG_MS)`` or later, in turn,
        and how many seconds its data may be behind; ``None``: read the primary."""
        bound = min(max_lag, self.max_lag)
        now = self._clock()
        with self._lock:
            fit = [
                (r, now - r.covered_at)
                for r in self.replicas
                if r.healthy and r.covered_at is not None and now - r.covered_at <= bound
            ]
        if not fit:
            return None
        return fit[next(self._turn) % len(fit)]

    def mark_down(self, replica: Replica, problem: str) -> None:
        """A read could not use ``replica``: skip it until a check finds it well."""
        with self._lock:
            was = replica.healthy
            replica.healthy, replica.problem = False, problem
        if was:
            log.warning("replica %s skipped: %s", replica.name, problem)

    def status(self) -> list[tuple[str, bool, float | None, str | None]]:
        """(name, healthy, seconds behind or None, problem) of each replica."""
        now = self._clock()
        with self._lock:
            return [
                (
                    r.name,
                    r.healthy,
                    None if r.covered_at is None else now - r.covered_at,
                    r.problem,
                )
                for r in self.replicas
            ]

    # ---- measuring ---------------------------------------------------------------

    def check(self) -> None:
        """One measurement: the primary's WAL position now, then each replica's replay."""
        sampled_at = self._clock()
        try:
            with self.primary_probe.connect() as conn:
                insert, block, segment = conn.execute(_PRIMARY_POSITION).one()
                if self._system_id is None:
                    self._system_id = _system_id(conn)
        except DBAPIError as exc:
            # Without a sample no coverage moves on: the replicas age out by themselves.
            log.warning("replica check: primary unreachable: %s", exc.orig)
            return
        self._samples.append((sampled_at, end_of_wal(insert, block, segment)))
        if self._settle:
            time.sleep(self._settle)
        for replica in self.replicas:
            self._check(replica)

    def _check(self, replica: Replica) -> None:
        try:
            with replica.probe.connect() as conn:
                in_recovery, replayed = conn.execute(_REPLAY_POSITION).one()
                if replica.system_id is None:
                    replica.system_id = _system_id(conn)
        except DBAPIError as exc:
            self.mark_down(replica, f"unreachable: {exc.orig}")
            return
        if not in_recovery or replayed is None:
            self.mark_down(replica, "not a standby (promoted?): its data no longer follows")
            return
        if (
            None not in (replica.system_id, self._system_id)
            and replica.system_id != self._system_id
        ):
            self.mark_down(replica, "a standby of another primary")
            return
        covered = max((at for at, position in self._samples if position <= replayed), default=None)
        with self._lock:
            if covered is not None and (replica.covered_at is None or covered > replica.covered_at):
                replica.covered_at = covered
            was = replica.healthy
            replica.healthy, replica.problem = True, None
        if not was:
            log.info("replica %s serves reads again", replica.name)

    # ---- running -----------------------------------------------------------------

    def start(self) -> None:
        """Check now and then every ``interval`` seconds in a daemon thread."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="replica-lag", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:  # the checker must outlive any surprise; reads fall back meanwhile
                log.exception("replica check failed")
            self._stop.wait(self.interval)


def _system_id(conn: Connection) -> int | None:
    """The cluster's system identifier (a standby has its primary's), if we may read it."""
    try:
        return int(conn.execute(_SYSTEM_ID).scalar_one())
    except DBAPIError:
        return None
