"""Clients waiting for jobs to finish (long polls and ``Prefer: wait``).

Each web process has a channel of its own (``jobs:finished:<token>``).  A job
accepted with ``Prefer: wait`` names it in its row (``reply_to``); a long poll on a
job still PENDING adds it to the job's ``waiters:<id>`` set in Redis.  Workers
publish, after each commit, to each channel named by the jobs the batch finished,
one message carrying the status documents meant for that process
(``shared.jobs.announce_finished``), so a web process parses only its own
waiters' outcomes, however many web processes run.  One listener thread per web
process subscribes to its channel and hands each document to the requests
waiting for that job, which answer with it: a waiting request reads no row and
holds no database connection while it waits (web runs gevent, so it holds no OS
thread either; thousands may wait at once).

A notification can be missed (Redis restarted, the listener reconnecting, a
worker's publish failing after its commit), so the listener also re-reads the
jobs waited for, in one query a second for all of them (``recheck``): each job
1 s after its wait began, then 2, 4, 8... s later (thousands of long polls on jobs
that stay PENDING cost a few rows a second, not thousands), and at once after the
listener reconnects.  A request also re-reads its job at its deadline.  Neither
is on the path of a notification that arrives.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis

from shared.jobs import FINISHED_CHANNEL_PREFIX, waiters_key

log = logging.getLogger(__name__)

RECHECK_SECONDS = 1.0
SUBSCRIBE_TIMEOUT_SECONDS = 0.5
# The listener polls this often, PINGs Redis after this long without a message and
# reconnects when the PING gets no answer in time (the client's reads are bounded too).
LISTEN_POLL_SECONDS = 1.0
QUIET_SECONDS = 3.0
PING_TIMEOUT_SECONDS = 2.0
# A long poll's registration outlives its wait by this much (it is not removed: a
# stale one costs a message the process ignores).
REGISTRATION_SLACK_SECONDS = 5

# Given the ids of waited-for jobs, the status documents of those that have finished.
Recheck = Callable[[list[uuid.UUID]], dict[str, dict[str, Any]]]


class Waiter:
    """One request waiting for one job."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.recheck_at = time.monotonic() + RECHECK_SECONDS
        self.recheck_after = RECHECK_SECONDS
        self.document: dict[str, Any] | None = None
        self._event = threading.Event()

    def resolve(self, document: dict[str, Any]) -> None:
        self.document = document
        self._event.set()

    def wait(self, timeout: float) -> dict[str, Any] | None:
        """The finished job's status document, or None after ``timeout`` seconds."""
        if timeout > 0:
            self._event.wait(timeout)
        return self.document


class JobWaiters:
    def __init__(
        self,
        client: redis.Redis,
        recheck: Recheck | None = None,
        registry: redis.Redis | None = None,
    ) -> None:
        """``client`` subscribes (it blocks on its socket); ``registry`` (the broker's
        database, where workers look waiters up) records long polls."""
        self._client = client
        self._registry = registry or client
        # Made in the process that waits (create_app runs after gunicorn's fork).
        self.channel = FINISHED_CHANNEL_PREFIX + uuid.uuid4().hex
        self._recheck = recheck
        self._waiting: dict[str, set[Waiter]] = {}
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._threads: list[threading.Thread] = []
        # True while every thread started last runs (each clears it as it ends): the
        # check of every wait, without a lock or a look at each thread.
        self._threads_running = False
        self._connecting_since = time.monotonic()  # the listener's current (re)connect

    @contextmanager
    def waiting(self, job_id: str, *, announce_for: float | None = None) -> Iterator[Waiter]:
        """Register a waiter for ``job_id`` for the block.  Enter it before reading or
        writing the job's row, so that a finish in between is not missed.

        ``announce_for``: the job's row may already exist, so ask the workers, through
        its ``waiters:<id>`` set, to tell this process (for that many seconds); a job
        written in the block names ``channel`` in its row instead.
        """
        self._ensure_listener()
        waiter = Waiter(job_id)
        with self._lock:
            self._waiting.setdefault(job_id, set()).add(waiter)
        if announce_for is not None:
            self._announce(job_id, announce_for)
        try:
            yield waiter
        finally:
            with self._lock:
                waiters = self._waiting.get(job_id)
                if waiters is not None:
                    waiters.discard(waiter)
                    if not waiters:
                        del self._waiting[job_id]

    def _announce(self, job_id: str, seconds: float) -> None:
        key = waiters_key(job_id)
        try:
            pipe = self._registry.pipeline(transaction=False)
            pipe.sadd(key, self.channel)
            pipe.expire(key, int(seconds) + REGISTRATION_SLACK_SECONDS)
            pipe.execute()
        except redis.RedisError as exc:  # the re-reads answer it (recheck, deadline)
            log.info("long poll of %s not registered: %s", job_id, exc)

    def _ensure_listener(self) -> None:
        if not self._threads_running:
            self._start_threads()
        # A notification published before the subscription took effect would be missed;
        # requests wait for it up to SUBSCRIBE_TIMEOUT_SECONDS after the listener began
        # connecting, not each its own: with Redis away, the rechecks answer instead.
        if not self._subscribed.is_set():
            left = self._connecting_since + SUBSCRIBE_TIMEOUT_SECONDS - time.monotonic()
            self._subscribed.wait(max(0.0, left))

    def _start_threads(self) -> None:
        with self._lock:
            if self._threads and all(t.is_alive() for t in self._threads):
                self._threads_running = True  # an ended thread's flag came after the restart
                return
            # Started lazily: after gunicorn forks, in the process that waits; a restarted
            # listener's waits wait for its own subscription, not its predecessor's.
            self._subscribed.clear()
            self._connecting_since = time.monotonic()
            targets: dict[str, Callable[[], None]] = {"job-waiters": self._listen}
            if self._recheck is not None:
                targets["job-recheck"] = self._recheck_loop
            self._threads = [
                threading.Thread(
                    target=self._run_until_it_ends, args=(target,), name=name, daemon=True
                )
                for name, target in targets.items()
            ]
            self._threads_running = True
            for thread in self._threads:
                thread.start()

    def _run_until_it_ends(self, target: Callable[[], None]) -> None:
        try:
            target()
        finally:
            self._threads_running = False  # the next wait starts them again

    def _listen(self) -> None:
        while True:
            self._connecting_since = time.monotonic()
            pubsub = self._client.pubsub(ignore_subscribe_messages=False)  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(self.channel)
                self._relay(pubsub)
            except (redis.RedisError, OSError, ValueError) as exc:
                self._subscribed.clear()
                log.info("job listener reconnecting: %s", exc)
                time.sleep(1.0)
            finally:
                pubsub.close()

    def _relay(self, pubsub: Any) -> None:
        """Hand on notifications; PING when quiet, and give the connection up when even
        that gets no answer (a frozen Redis, a blackhole: nothing else would tell)."""
        heard = time.monotonic()
        pinged = False
        while True:
            message = pubsub.get_message(timeout=LISTEN_POLL_SECONDS)
            now = time.monotonic()
            if message is None:
                if now - heard > QUIET_SECONDS + PING_TIMEOUT_SECONDS:
                    raise redis.TimeoutError("no answer to PING: Redis is not answering")
                if now - heard > QUIET_SECONDS and not pinged:
                    pubsub.ping()
                    pinged = True
                continue
            heard, pinged = now, False
            if message["type"] == "subscribe":
                self._subscribed.set()
                self._recheck_all_soon()  # notifications may have been missed
            elif message["type"] == "message":
                self.resolve(json.loads(message["data"]))

    def resolve(self, documents: dict[str, dict[str, Any]]) -> None:
        """Hand each finished job's document to whoever waits for it."""
        with self._lock:
            # Whichever is smaller is walked: a batch of 200 or a handful of waiters.
            if len(documents) <= len(self._waiting):
                ids = [job_id for job_id in documents if job_id in self._waiting]
            else:
                ids = [job_id for job_id in self._waiting if job_id in documents]
            for job_id in ids:
                for waiter in self._waiting[job_id]:
                    waiter.resolve(documents[job_id])

    def _recheck_all_soon(self) -> None:
        with self._lock:
            for waiters in self._waiting.values():
                for waiter in waiters:
                    waiter.recheck_at = 0.0

    def _recheck_loop(self) -> None:
        assert self._recheck is not None
        while True:
            time.sleep(RECHECK_SECONDS)
            now = time.monotonic()
            overdue = []
            with self._lock:
                for job_id, waiters in self._waiting.items():
                    due = [w for w in waiters if w.recheck_at <= now]
                    for waiter in due:
                        waiter.recheck_after *= 2
                        waiter.recheck_at = now + waiter.recheck_after
                    if due:
                        overdue.append(job_id)
            if not overdue:
                continue
            try:
                self.resolve(self._recheck([uuid.UUID(job_id) for job_id in overdue]))
            except Exception as exc:  # the database is away: requests re-read at their deadline
                log.info("job recheck failed: %s", exc)
