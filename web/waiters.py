"""Long polls on a job, woken by the workers' ``jobs:finished`` notifications.

One listener thread per web process subscribes to the channel; a waiting request
sleeps on an Event instead of polling the database in a loop.  If Redis is
unreachable the wait still ends: each waiter re-reads the job once a second.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable

import redis

from shared.jobs import FINISHED_CHANNEL

log = logging.getLogger(__name__)

RECHECK_SECONDS = 1.0


class JobWaiters:
    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._events: defaultdict[str, set[threading.Event]] = defaultdict(set)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _ensure_listener(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                # Started lazily: after gunicorn forks, in the process that waits.
                self._thread = threading.Thread(
                    target=self._listen, name="job-waiters", daemon=True
                )
                self._thread.start()

    def _listen(self) -> None:
        while True:
            try:
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
                pubsub.subscribe(FINISHED_CHANNEL)
                for message in pubsub.listen():
                    self._wake(json.loads(message["data"]))
            except (redis.RedisError, OSError, ValueError) as exc:
                log.info("job listener reconnecting: %s", exc)
                time.sleep(1.0)

    def _wake(self, job_ids: list[str]) -> None:
        with self._lock:
            for job_id in job_ids:
                for event in self._events.get(job_id, ()):
                    event.set()

    def wait(self, job_id: str, timeout: float, finished: Callable[[], bool]) -> None:
        """Return once ``finished()`` is true or ``timeout`` seconds have passed."""
        if timeout <= 0 or finished():
            return
        self._ensure_listener()
        event = threading.Event()
        with self._lock:
            self._events[job_id].add(event)
        try:
            deadline = time.monotonic() + timeout
            while True:
                # Registered before this check, so a finish between the two is not missed.
                if finished():
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                event.wait(min(remaining, RECHECK_SECONDS))
                event.clear()
        finally:
            with self._lock:
                self._events[job_id].discard(event)
                if not self._events[job_id]:
                    del self._events[job_id]
