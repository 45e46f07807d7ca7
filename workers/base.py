"""Draining a partition: the one path by which jobs are applied.

A ``jobs.drain`` message only says "look at partition Q".  The consumer
repeatedly locks the oldest PENDING jobs of Q (in commit order) and hands them,
as one batch, to the handler of Q's kind, which decides every job in order and
writes the batch's changes set-wise (rule 6); the jobs' outcomes are written in
the same transaction, with one UPDATE:

* a refusal (``DomainError``) is an outcome: the job is finished FAILED with its
  code.  Handlers decide before they write, so a refusal never leaves a partial
  write behind and no savepoint is needed;
* any other error rolls the batch back, and the batch is replayed one job at a
  time, so a bad job fails alone; a job that keeps failing is finished FAILED
  ``INTERNAL`` after ``JOB_MAX_ATTEMPTS`` attempts;
* transient database errors (lost connection, deadlock, serialization failure)
  propagate, so the task retries with backoff and nothing counts as an attempt.

A single job is a batch of one.  Effects outside PostgreSQL happen only after
commit, each kind in one Redis round trip: the product cache refresh, then the
``jobs:finished`` notification carrying every finished job's status document
(web answers waiting clients from it, without reading the row again).

Workers run a thread pool, so distinct partitions drain in parallel; nothing
sleeps while holding a partition back.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from shared.cache import ProductCache, make_redis
from shared.config import Settings
from shared.db import (
    make_engine,
    make_session_factory,
    refresh_stale_plans,
    worker_client_timeout,
)
from shared.domain.errors import DomainError, ErrorCode
from shared.domain.products import get_products, product_document
from shared.jobs import (
    PARTITION_KIND_OF,
    WAKE_FLAG_SECONDS,
    JobKind,
    JobOutcome,
    JobRecord,
    announce_finished,
    count_attempt,
    finish_jobs,
    get_job,
    has_unheld_pending,
    lock_pending_batch,
    lock_pending_job,
    note_drain,
    wake_key,
    wake_partition,
)
from shared.metrics import count_finished, draining, observe_batch
from shared.partitions import HISTORY_QUEUE, PartitionKind, kind_queues, queue_kind

log = logging.getLogger(__name__)


@dataclass
class Effects:
    """What a batch changed outside its own rows, acted on after commit."""

    finished: list[JobOutcome] = field(default_factory=list)
    products: set[int] = field(default_factory=set)
    # The changed products as the batch commits them (id -> (document, version)),
    # read once before commit: marked pending then, stored in the cache after.
    committed_products: dict[int, tuple[dict[str, Any], int]] = field(default_factory=dict)
    history: bool = False
    # The partitions a batch of jobs was committed for (their lastDrainAt).
    drained: set[str] = field(default_factory=set)
    # Keyed, so that an action wanted by many jobs of a batch runs once.
    later: dict[str, Callable[[Runtime], None]] = field(default_factory=dict)

    def absorb(self, other: Effects) -> None:
        self.finished.extend(other.finished)
        self.products |= other.products
        self.committed_products.update(other.committed_products)
        self.history |= other.history
        self.drained |= other.drained
        self.later.update(other.later)


Outcome = dict[str, Any] | DomainError
# Decides and writes a batch of one partition's jobs; one outcome per job, in order.
Handler = Callable[["Runtime", Session, list[JobRecord], Effects], list[Outcome]]

HANDLERS: dict[PartitionKind, Handler] = {}


def handles(kind: PartitionKind) -> Callable[[Handler], Handler]:
    """Register the batch handler of a partition kind (returns it unchanged)."""

    def register(handler: Handler) -> Handler:
        HANDLERS[kind] = handler
        return handler

    return register


class RetryLater(Exception):
    """A job failed unexpectedly but has attempts left: retry the partition later."""


def is_transient(exc: BaseException) -> bool:
    """Errors that say nothing about the job: the database is away or a lock race was lost."""
    if isinstance(exc, (OperationalError, InterfaceError)):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


class Runtime:
    """Per-process resources of a worker, built on first use (after any fork).

    Shared by the pool's threads: each resource is built once, under a lock.
    """

    def __init__(self, settings: Settings, send: Callable[[str], None]) -> None:
        self.settings = settings
        self._send = send
        self._lock = threading.Lock()
        self._session_factory: sessionmaker[Session] | None = None
        self._injected = False
        self._autocommit: Engine | None = None
        self._coordination: redis.Redis | None = None
        self._broker_client: redis.Redis | None = None
        self._cache: ProductCache | None = None

    @property
    def session_factory(self) -> sessionmaker[Session]:
        with self._lock:
            if self._session_factory is None:
                # A connection per drain thread, plus the post-drain checks.
                engine = make_engine(
                    self.settings,
                    pool_size=self.settings.worker_threads + 2,
                    pre_ping=False,
                    client_timeout=worker_client_timeout(self.settings),
                )
                self._session_factory = make_session_factory(engine)
            return self._session_factory

    def use_session_factory(self, factory: sessionmaker[Session]) -> None:
        self._session_factory = factory
        self._injected = True

    @contextmanager
    def autocommit(self) -> Iterator[Connection | Session]:
        """A connection on which a statement is its own transaction (one round trip, no
        BEGIN/ROLLBACK); tests that inject a session factory get a session of it."""
        if self._injected:
            with self.session_factory() as session:
                yield session
            return
        with self._autocommit_engine().connect() as connection:
            yield connection

    def _autocommit_engine(self) -> Engine:
        engine: Engine = self.session_factory.kw["bind"]  # (takes the lock itself)
        with self._lock:
            if self._autocommit is None:
                # The same pool; its connections switched to autocommit while checked out.
                self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
            return self._autocommit

    @property
    def coordination(self) -> redis.Redis:
        with self._lock:
            if self._coordination is None:
                self._coordination = make_redis(
                    self.settings.coordination_url, timeout=2.0, settings=self.settings
                )
            return self._coordination

    @property
    def cache(self) -> ProductCache:
        with self._lock:
            if self._cache is None:
                self._cache = ProductCache(
                    make_redis(self.settings.cache_url, timeout=0.5, settings=self.settings),
                    self.settings.cache_ttl_seconds,
                )
            return self._cache

    @property
    def broker(self) -> redis.Redis:
        """The broker's database: the queues, and their wake flags beside them."""
        with self._lock:
            if self._broker_client is None:
                self._broker_client = make_redis(
                    self.settings.broker_url, timeout=2.0, settings=self.settings
                )
            return self._broker_client

    def wake(self, queue: str) -> None:
        """Wake ``queue`` unless a wake-up is in flight.  Never call inside a transaction."""
        wake_partition(self.broker, queue, self._send)

    def claim(self, queue: str) -> bool:
        """Set ``queue``'s wake flag if it is clear: True if this caller now holds it."""
        return bool(self.broker.set(wake_key(queue), 1, nx=True, ex=WAKE_FLAG_SECONDS))

    def release(self, queue: str) -> None:
        try:
            self.broker.delete(wake_key(queue))
        except redis.RedisError as exc:
            log.warning("could not clear the wake flag of %s: %s", queue, exc)

    def backlog(self, queues: list[str]) -> int:
        """Messages waiting in ``queues`` (Redis lists of the broker's database, one round
        trip), 0 if unknown."""
        try:
            pipe = self.broker.pipeline(transaction=False)
            for queue in queues:
                pipe.llen(queue)
            return sum(int(n) for n in pipe.execute())
        except redis.RedisError:
            return 0

    def force_wake(self, queue: str) -> None:
        """Wake ``queue`` even if flagged: the flag may outlive a lost message (the sweeper)."""
        self._send(queue)


def _apply_batch(rt: Runtime, session: Session, jobs: list[JobRecord], effects: Effects) -> None:
    if not jobs:
        return
    kind = PARTITION_KIND_OF[JobKind(jobs[0].kind)]
    outcomes = HANDLERS[kind](rt, session, jobs, effects)
    at = dt.datetime.now(dt.UTC)
    finished = [
        JobOutcome.failed(job, outcome.code, outcome.message, at)
        if isinstance(outcome, DomainError)
        else JobOutcome.succeeded(job, outcome, at)
        for job, outcome in zip(jobs, outcomes, strict=True)
    ]
    finish_jobs(session, finished)
    effects.finished.extend(finished)
    mark_products_pending(rt, session, effects)


def mark_products_pending(rt: Runtime, session: Session, effects: Effects) -> None:
    """Before commit: cached products the batch changed miss until refreshed after commit,
    so that a read after a job shows SUCCEEDED never gets the old stock from the cache."""
    if effects.products:
        unread = sorted(effects.products - set(effects.committed_products))
        for product in get_products(session, unread):
            effects.committed_products[product.id] = (product_document(product), product.version)
        rt.cache.mark_products_pending(
            {pid: version for pid, (_doc, version) in effects.committed_products.items()}
        )


# Batches one drain task applies before its kind goes to the back of the line.
MAX_BATCHES_PER_DRAIN = 20


def drain_partition(rt: Runtime, queue: str) -> int:
    """Apply the PENDING jobs of ``queue``'s kind in commit order; returns how many
    finished (``_drain``), counted and timed (``shop_drains_total``, ``shop_drain_seconds``)."""
    with draining(queue):
        return _drain(rt, queue)


def _drain(rt: Runtime, queue: str) -> int:
    """Apply the PENDING jobs of every partition of ``queue``'s kind, batch after batch.

    A wake-up names one partition, but the drain takes every partition of the kind that
    has PENDING jobs and that no other drainer holds (``lock_pending_batch``): at any
    concurrency one message, one transaction and one commit serve the jobs in flight,
    while each partition's advisory lock keeps its jobs in order (rule 6).

    The kind's wake flag stays set while the drain goes on, so web sends no further
    wake-ups for jobs it will find anyway: while batches keep finding jobs (those
    committed while the last one ran: a group commit of the drain's own), the next
    batch follows at once, with no message, flag or look in between.  When a batch
    comes back empty, the flag is cleared and the kind looked at once more (one
    statement): a job committed before the clear is found by that look, and the drain
    takes the flag back and goes on (no message needed); a job committed after the
    clear sets the flag itself and sends a wake-up (``web.publish``).  A job of a
    partition another drainer holds is that drainer's: it looks again after its own
    commit.  No job is left behind.

    A full batch means more is waiting than one batch takes: a second wake-up (once per
    drain) lets another pool thread or worker drain the partitions this one has no room
    for.  After ``MAX_BATCHES_PER_DRAIN`` the kind is woken by a message instead, behind
    the other kinds' wake-ups, so a busy kind cannot hold a pool thread for ever.
    """
    queues = kind_queues(queue_kind(queue), rt.settings.partitions)
    if queue not in queues:  # a queue left over from a larger PARTITIONS
        queues.append(queue)
    done = 0
    helped = False
    for _ in range(MAX_BATCHES_PER_DRAIN):
        applied = apply_next_batch(rt, queues)
        done += applied
        if applied >= rt.settings.batch_size and not helped:
            helped = True  # more are waiting than one batch takes
            _ask_for_help(rt, queue)
        if applied:
            continue  # the flag still keeps web quiet: look for what came in meanwhile
        rt.release(queue)
        if not has_pending(rt, queues):
            return done
        if not rt.claim(queue):
            return done  # a job committed since sent a wake-up of its own
    rt.release(queue)
    try:
        rt.wake(queue)  # sends unless a wake-up of someone else's is already in flight
    except Exception as exc:  # the sweeper wakes it if this is lost
        log.warning("could not re-wake %s: %s", queue, exc)
    return done


def _ask_for_help(rt: Runtime, queue: str) -> None:
    try:
        rt.force_wake(queue)
    except Exception as exc:  # only parallelism is lost
        log.warning("could not wake a second drainer of %s: %s", queue, exc)


def has_pending(rt: Runtime, queues: list[str]) -> bool:
    """Whether one of ``queues`` holds a PENDING job that no drainer holds, as committed
    now (a fresh snapshot)."""
    with rt.autocommit() as executor:
        return has_unheld_pending(executor, queues)


def apply_next_batch(rt: Runtime, queues: list[str]) -> int:
    """Lock, decide and commit one batch of the PENDING jobs of ``queues`` (one kind)."""
    effects = Effects()
    jobs: list[JobRecord] = []
    try:
        with rt.session_factory() as session, session.begin():
            refresh_stale_plans(session)
            jobs = lock_pending_batch(session, queues, rt.settings.batch_size)
            _apply_batch(rt, session, jobs, effects)
    except Exception as exc:
        if is_transient(exc) or not jobs:
            raise
        log.exception(
            "batch of %d on %s failed; replaying one by one",
            len(jobs),
            queues[0],
            extra={"job_ids": [str(job.id) for job in jobs], "queues": queues},
        )
        effects = Effects()
        for job in jobs:
            _apply_alone(rt, job.partition, job.id, effects)
    if jobs:
        effects.drained = {job.partition for job in jobs}  # lastDrainAt of each
        observe_batch(queues[0], len(jobs))
    after_commit(rt, effects)
    return len(jobs)


def _apply_alone(rt: Runtime, queue: str, job_id: uuid.UUID, effects: Effects) -> None:
    """One job in its own transaction; an unexpected error counts as an attempt."""
    alone = Effects()
    try:
        with rt.session_factory() as session, session.begin():
            job = lock_pending_job(session, queue, job_id)
            if job is None:
                return
            _apply_batch(rt, session, [job], alone)
    except Exception as exc:
        if is_transient(exc):
            raise
        # The attempt is committed before RetryLater is raised: raising inside the
        # transaction would roll the count back and the job would retry forever.
        with rt.session_factory() as session, session.begin():
            attempts = count_attempt(session, job_id)
            given_up: JobOutcome | None = None
            if attempts >= rt.settings.job_max_attempts:
                record = get_job(session, job_id)
                assert record is not None  # its attempt was just counted
                given_up = JobOutcome.failed(
                    record,
                    ErrorCode.INTERNAL,
                    "the job could not be applied",
                    dt.datetime.now(dt.UTC),
                )
                finish_jobs(session, [given_up])
        if given_up is None:
            log.exception(
                "job %s failed (attempt %d); will retry",
                job_id,
                attempts,
                extra={"job_id": str(job_id)},
            )
            after_commit(rt, effects)
            raise RetryLater(str(job_id)) from exc
        log.exception(
            "job %s failed %d times; finished it INTERNAL",
            job_id,
            attempts,
            extra={"job_id": str(job_id)},
        )
        effects.finished.append(given_up)
        return
    effects.absorb(alone)


def after_commit(rt: Runtime, effects: Effects) -> None:
    """Refresh the product cache, run deferred actions, then tell waiters and wake the
    history listener in one round trip (waiters last: whoever is told a job finished
    finds the cache refreshed).  Never raises.

    Every committed outcome passes here exactly once, so this is where jobs are
    counted finished (in memory: no round trip)."""
    count_finished(effects.finished)
    if effects.committed_products:
        try:
            rt.cache.refresh_products(effects.committed_products)
        except Exception:
            log.exception("product cache refresh failed")
    for action in effects.later.values():
        try:
            action(rt)
        except Exception:
            log.exception("post-commit action failed")
    if not effects.finished and not effects.history and not effects.drained:
        return
    try:
        # Pub/sub ignores logical databases: the broker's client publishes too.
        pipe = rt.broker.pipeline(transaction=False)
        if effects.drained:
            note_drain(pipe, effects.drained)
        if effects.finished:
            announce_finished(pipe, effects.finished)
        if effects.history:
            pipe.set(wake_key(HISTORY_QUEUE), 1, nx=True, ex=WAKE_FLAG_SECONDS)
        answers = pipe.execute()
    except redis.RedisError as exc:
        log.warning("finish notification / history wake-up not sent (re-checks will): %s", exc)
        return
    if effects.history and answers[-1]:
        try:
            rt.force_wake(HISTORY_QUEUE)  # its flag is set: this is the one wake-up
        except Exception as exc:
            rt.release(HISTORY_QUEUE)
            log.warning("history wake-up not sent (relay will): %s", exc)
