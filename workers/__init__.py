"""Celery workers: partition consumers, the history listener and beat jobs.

``make_celery()`` builds the app from ``Settings`` and registers every task by
its wire name; importing this package builds nothing.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from pathlib import Path
from typing import Any

from celery import Celery, signals
from kombu import Exchange, Queue
from sqlalchemy.exc import InterfaceError, OperationalError

from shared.broker import TRANSPORT as BROKER_TRANSPORT
from shared.cache import redis_keepalive_options
from shared.config import Settings
from shared.jobs import DRAIN_TASK, HISTORY_TASK, task_for_queue
from shared.logs import configure as configure_logging
from shared.logs import raw_line
from shared.metrics import prepare_multiprocess_dir
from shared.partitions import HISTORY_QUEUE, all_partition_queues
from workers.base import RetryLater, Runtime, drain_partition

MAINTENANCE_QUEUE = "maintenance"
SWEEP_TASK = "maintenance.sweep"
RELAY_TASK = "maintenance.relay_outbox"
RETENTION_TASK = "maintenance.keep_time_partitions"
EXPIRE_TASK = "maintenance.expire_unpaid_orders"
PARTITIONS_TASK = "maintenance.create_history_partitions"

# Wake-ups are cheap and idempotent; a transient failure (database away) is retried
# with backoff, and past the bound the sweeper wakes the partition again.
_RETRY_POLICY: dict[str, Any] = {
    "autoretry_for": (OperationalError, InterfaceError, RetryLater),
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "retry_jitter": True,
    "max_retries": 30,
}


def retention_interval(settings: Settings) -> float:
    """How often beat runs the retention task: a quarter of a partition's width, at most
    a minute."""
    return min(60.0, settings.job_partition_seconds / 4)


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or Settings.from_env()
    prepare_multiprocess_dir(settings.prometheus_multiproc_dir)
    app = Celery("shop", set_as_current=False)
    app.conf.update(
        broker_url=settings.broker_url,
        broker_transport=BROKER_TRANSPORT,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_seconds,
            # No wait on the broker without a bound: a frozen or cut-off Redis fails
            # the call (Celery reconnects) instead of hanging a thread; kombu polls
            # with BRPOP timeouts of 1 s, well under this.
            "socket_timeout": 10,
            "socket_connect_timeout": 2,
            **redis_keepalive_options(settings),
        },
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # the jobs table is the result
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit_seconds,
        task_soft_time_limit=settings.task_time_limit_seconds - 10,
        # Off by default: each event is a broker publish per task.  Flower turns
        # them on when it connects (enable_events), so operators still see tasks.
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        # Every queue, declared: Flower's Broker tab lists these (with their backlogs)
        # when it has no worker's active_queues, and a task sent without a queue goes
        # to one that is consumed rather than to an unconsumed "celery".  Each has its
        # own exchange and key, as Celery makes for an undeclared queue: a bare
        # Queue(name) would be bound to the default exchange and key, and a message
        # published through them would reach every queue.
        task_queues=[
            Queue(name, Exchange(name, type="direct"), routing_key=name)
            for name in [
                *all_partition_queues(settings.partitions),
                HISTORY_QUEUE,
                MAINTENANCE_QUEUE,
            ]
        ],
        task_default_queue=MAINTENANCE_QUEUE,
        beat_schedule={
            "sweep-pending-jobs": {
                "task": SWEEP_TASK,
                "schedule": settings.sweep_interval_seconds,
                "options": {
                    "queue": MAINTENANCE_QUEUE,
                    "expires": settings.sweep_interval_seconds * 2,
                },
            },
            "relay-outbox": {
                "task": RELAY_TASK,
                "schedule": 1.0,
                "options": {"queue": MAINTENANCE_QUEUE, "expires": 2.0},
            },
            # API.md: an unpaid order expires "within a few seconds of expiresAt".
            "expire-unpaid-orders": {
                "task": EXPIRE_TASK,
                "schedule": 1.0,
                "options": {"queue": MAINTENANCE_QUEUE, "expires": 2.0},
            },
            # Months ahead of the rows that need them (shared.table_partitions); hourly,
            # so a beat that was away makes them up within the hour.
            "create-history-partitions": {
                "task": PARTITIONS_TASK,
                "schedule": 3600.0,
                "options": {"queue": MAINTENANCE_QUEUE, "expires": 600.0},
            },
            # Partitions ahead and past retention (shared.retention): several times per
            # partition width, at most a minute apart, so a partition is dropped soon
            # after it may be and one is always made well ahead.
            "keep-time-partitions": {
                "task": RETENTION_TASK,
                "schedule": retention_interval(settings),
                "options": {"queue": MAINTENANCE_QUEUE, "expires": retention_interval(settings)},
            },
        },
    )

    def send(queue: str) -> None:
        app.send_task(task_for_queue(queue), args=[queue], queue=queue)

    if settings.log_format == "json":
        _log_as_json(app, settings)
    if settings.beat_heartbeat_file:
        _beat_heartbeat(Path(settings.beat_heartbeat_file))

    def retention_at_start(sender: Any, **_kwargs: Any) -> None:
        # Beat's first interval run comes one interval after it starts: make this
        # window's partitions now, so rows of a fresh database go to them at once.
        if getattr(sender, "app", None) is app:
            app.send_task(RETENTION_TASK, queue=MAINTENANCE_QUEUE)

    signals.beat_init.connect(retention_at_start, weak=False)

    def freeze_start_up_objects(**_kwargs: Any) -> None:
        # What the worker built to start (Celery, kombu, SQLAlchemy, the tasks) lives as
        # long as the process: frozen out of the collector's generations, a full
        # collection walks only what was made since (as web does, web/wsgi.py).
        gc.freeze()

    signals.worker_ready.connect(freeze_start_up_objects, weak=False)

    runtime = Runtime(settings, send)
    app.conf.shop_runtime = runtime
    _register_tasks(app, runtime)
    return app


def _log_as_json(app: Celery, settings: Settings) -> None:
    """LOG_FORMAT=json: Celery leaves logging to us (a ``setup_logging`` receiver), and
    the worker's and beat's start-up banners, printed text rather than log records,
    are off (their content is in Flower and in the first log lines)."""
    process = _process_name(sys.argv)

    def setup(loglevel: int | str | None = None, **_: Any) -> None:
        configure_logging("json", loglevel or settings.log_level, process)

    signals.setup_logging.connect(setup, weak=False)
    # Now too: what Celery says before it sets up logging (its superuser warning) is a
    # JSON line as well.
    setup()
    for attr in ("Worker", "Beat"):
        base = getattr(app, attr)

        def quiet_init(self: Any, *args: Any, _base: Any = base, **kwargs: Any) -> None:
            kwargs["quiet"] = True
            _base.__init__(self, *args, **kwargs)

        setattr(app, attr, type(f"Quiet{attr}", (base,), {"__init__": quiet_init}))
    # The worker's shutdown notices ("worker: Warm shutdown") are written from its
    # signal handlers straight to the file descriptor (no logging: no lock there); so
    # is this, as a JSON line.
    from celery.apps import worker as celery_worker

    def say(message: str, _file: Any = None) -> None:
        with contextlib.suppress(OSError):  # as Celery's: best effort, never raises
            os.write(2, raw_line(message, process, logger="celery.apps.worker"))

    celery_worker.safe_say = say  # type: ignore[attr-defined]  # untyped in celery-types


def _beat_heartbeat(path: Path) -> None:
    """In beat only (``beat_init``): touch ``path`` whenever a due task is sent."""

    def touch(**_: Any) -> None:
        with contextlib.suppress(OSError):  # a full disk must not stop the schedule
            path.touch()

    def started(**_: Any) -> None:
        touch()
        signals.before_task_publish.connect(touch, weak=False)

    signals.beat_init.connect(started, weak=False)


def _process_name(argv: list[str]) -> str:
    """``process`` of the JSON lines: beat, history (its node name) or worker."""
    if "beat" in argv:
        return "beat"
    if any(arg.startswith(("--hostname=history", "-nhistory")) for arg in argv):
        return "history"
    return "worker"


def _register_tasks(app: Celery, runtime: Runtime) -> None:
    # Importing the handler modules registers apply_<kind> for each job kind.
    from workers import beat, coupons, history, orders, points, products  # noqa: F401

    @app.task(name=DRAIN_TASK, **_RETRY_POLICY)
    def drain(queue: str) -> int:
        return drain_partition(runtime, queue)

    @app.task(name=HISTORY_TASK, **_RETRY_POLICY)
    def drain_history(_queue: str) -> int:
        return history.drain_outbox(runtime)

    @app.task(name=SWEEP_TASK, ignore_result=True)
    def sweep() -> list[str]:
        return beat.sweep_pending_jobs(runtime)

    @app.task(name=RELAY_TASK, ignore_result=True)
    def relay() -> bool:
        return beat.relay_outbox(runtime)

    @app.task(name=EXPIRE_TASK, ignore_result=True)
    def expire() -> int:
        return beat.expire_unpaid_orders(runtime)

    @app.task(name=PARTITIONS_TASK, ignore_result=True)
    def create_partitions() -> list[str]:
        return beat.create_history_partitions(runtime)

    @app.task(name=RETENTION_TASK, ignore_result=True)
    def keep_time_partitions() -> dict[str, list[str]]:
        return beat.keep_time_partitions(runtime)


def runtime_of(app: Celery) -> Runtime:
    runtime: Runtime = app.conf.shop_runtime
    return runtime
