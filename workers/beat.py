"""Periodic jobs run by beat: the sweeper, the outbox relay, the retention of jobs and
outbox rows, the expiry of unpaid orders, the history tables' monthly partitions."""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy.exc import DBAPIError

from shared.domain.history import has_undelivered_outbox
from shared.domain.orders import expire_order, list_expired_orders
from shared.jobs import stale_partitions
from shared.metrics import count_retention, count_swept
from shared.partitions import HISTORY_QUEUE, kind_queues, queue_kind
from shared.retention import TABLES, drop_expired, ensure_partitions, purge_defaults
from shared.table_partitions import ensure_month_partitions
from workers.base import Effects, Runtime, after_commit, mark_products_pending

log = logging.getLogger(__name__)


def sweep_pending_jobs(rt: Runtime) -> list[str]:
    """Wake every partition holding a job PENDING longer than ``SWEEP_AFTER_SECONDS``.

    The broker may have lost the wake-up (a restart without its data, a publish
    that failed after commit, a worker killed holding the message: celery#4976),
    so the job rows, not the messages, decide what is re-sent.  A drain takes every
    partition of its kind, so one wake-up per kind is enough.
    """
    with rt.session_factory() as session:
        queues = stale_partitions(session, dt.timedelta(seconds=rt.settings.sweep_after_seconds))
    woken: list[str] = []
    for kind in sorted({queue_kind(queue) for queue in queues}):
        # A wake-up already waiting in a queue of the kind will do; while the workers
        # are down, re-sending every interval would only pile up messages.
        if rt.backlog(kind_queues(kind, rt.settings.partitions)) == 0:
            first = min(q for q in queues if queue_kind(q) is kind)
            rt.force_wake(first)
            woken.append(first)
    count_swept(woken)
    if queues:
        log.info("sweeper re-sent wake-ups for %s", queues)
    return queues


def relay_outbox(rt: Runtime) -> bool:
    """Wake the history listener if an outbox row has waited (its wake-up was lost)."""
    with rt.session_factory() as session:
        waiting = has_undelivered_outbox(session, dt.timedelta(seconds=1))
    if waiting:
        rt.force_wake(HISTORY_QUEUE)
    return waiting


# A drop that held (or waited for) its table's lock longer than this is logged as a warning.
SLOW_LOCK_MS = 100.0
# Batches of a default partition's rows deleted per run (5,000 rows each).
DEFAULT_PURGE_BATCHES = 20


def keep_time_partitions(rt: Runtime) -> dict[str, list[str]]:
    """The retention of ``jobs`` and ``outbox`` (``shared.retention``): make partitions
    ahead, drop the ones wholly past ``JOB_RETENTION_HOURS`` (with their jobs'
    Idempotency-Keys), then delete a few batches of old rows from the default
    partitions.  Each step in its own short transaction; a step that cannot take its
    locks in time (``lock_timeout``) is left to the next run."""
    settings = rt.settings
    outcome: dict[str, list[str]] = {"created": [], "dropped": [], "held": [], "waiting": []}
    try:
        with rt.session_factory() as session, session.begin():
            outcome["created"] = ensure_partitions(
                session, width_seconds=settings.job_partition_seconds
            )
        for table in TABLES:  # one transaction per table: one parent locked at a time
            with rt.session_factory() as session, session.begin():
                dropped = drop_expired(session, retention=settings.job_retention, tables=(table,))
            outcome["dropped"] += dropped.dropped
            outcome["held"] += dropped.held
            outcome["waiting"] += dropped.waiting
            for name, ms in dropped.locked_ms.items():
                # Statements on the table queue behind the lock meanwhile: say when long.
                (log.warning if ms > SLOW_LOCK_MS else log.info)(
                    "%s: parent locked %.1f ms to drop partitions", name, ms
                )
        for _ in range(DEFAULT_PURGE_BATCHES):
            with rt.session_factory() as session, session.begin():
                if purge_defaults(session, retention=settings.job_retention) == 0:
                    break
    except DBAPIError as exc:  # the database is away or a lock wait ran out: next run
        log.warning("retention step not done: %s", exc)
    for name in ("created", "dropped", "held"):
        count_retention(name, outcome[name])
    if outcome["created"] or outcome["dropped"]:
        log.info("time partitions created %s, dropped %s", outcome["created"], outcome["dropped"])
    return outcome


def create_history_partitions(rt: Runtime) -> list[str]:
    """This month's and the next months' partitions of the history tables, where missing
    (``shared.table_partitions``); returns the partitions created."""
    with rt.session_factory() as session, session.begin():
        created = ensure_month_partitions(session)
    if created:
        log.info("history partitions created: %s", created)
    return created


# Orders expired per run; the next run (a second later) takes the rest.
EXPIRE_BATCH = 200


def expire_unpaid_orders(rt: Runtime) -> int:
    """Fail every order left unpaid past its ``expiresAt``; returns how many it failed.

    Each order goes through the admin FAILED path in its own transaction (stock back in
    ascending product id, so it cannot deadlock with an order batch), and loses
    cleanly to a payment, an admin change or another expiry that got the order first
    (its conditional UPDATE matches nothing).  After each commit the restocked
    products' cache entries are refreshed and the history listener is woken, as after
    an admin FAILED.
    """
    with rt.session_factory() as session:
        due = list_expired_orders(session, EXPIRE_BATCH)
    expired = 0
    for order_id, version in due:
        effects = Effects()
        try:
            with rt.session_factory() as session, session.begin():
                restocked = expire_order(session, order_id, version)
                if restocked is None:
                    continue
                effects.history = True
                effects.products |= set(restocked)
                mark_products_pending(rt, session, effects)
        except DBAPIError as exc:  # the database is away or a lock wait ran out: next run
            log.warning(
                "expiry of order %s not applied: %s", order_id, exc, extra={"order_id": order_id}
            )
            break
        after_commit(rt, effects)
        expired += 1
    if expired:
        log.info("expired %d unpaid orders", expired)
    return expired
