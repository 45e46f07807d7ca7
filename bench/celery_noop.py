"""The ceiling of Celery on this machine: a solo worker running a no-op task through Redis."""

from __future__ import annotations

import os

from celery import Celery

app = Celery("bench-noop", broker=os.environ["NOOP_BROKER_URL"], set_as_current=False)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
)


@app.task(name="bench.noop")
def noop(_i: int) -> None:
    return None
