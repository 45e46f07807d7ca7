"""web.waiters.JobWaiters on a real Redis: notifications reach the waiting request, and a
listener that ends is started again by the next wait."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from web.waiters import JobWaiters


@pytest.fixture
def broker(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _wait_for_notification(waiters: JobWaiters, broker: redis.Redis, job_id: str) -> Any:
    with waiters.waiting(job_id) as waiter:
        document = {"jobId": job_id, "status": "SUCCEEDED"}
        broker.publish(waiters.channel, json.dumps({job_id: document}))
        return waiter.wait(5)


def test_a_notification_reaches_the_waiting_request(broker: redis.Redis) -> None:
    waiters = JobWaiters(broker)
    assert _wait_for_notification(waiters, broker, "job-a") == {
        "jobId": "job-a",
        "status": "SUCCEEDED",
    }


# The listener's end is reported by the thread hook; here it is the point.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_listener_that_ended_is_started_again_by_the_next_wait(
    broker: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    waiters = JobWaiters(broker)
    assert _wait_for_notification(waiters, broker, "job-b") is not None
    (first,) = waiters._threads

    # A bug the listener does not expect (not a Redis error it reconnects from) ends it.
    def fail(_documents: Any) -> None:
        raise RuntimeError("an unexpected bug in the listener")

    monkeypatch.setattr(waiters, "resolve", fail)
    broker.publish(waiters.channel, "{}")
    first.join(timeout=5)
    assert not first.is_alive()
    monkeypatch.undo()

    started = time.monotonic()
    assert _wait_for_notification(waiters, broker, "job-c") == {
        "jobId": "job-c",
        "status": "SUCCEEDED",
    }
    (second,) = waiters._threads
    assert second is not first
    assert second.is_alive()
    assert time.monotonic() - started < 5
