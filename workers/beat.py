"""Periodic jobs run by beat: the sweeper, the outbox relay, the idempotency purge."""

from __future__ import annotations

import datetime as dt
import logging

from shared.domain.history import has_undelivered_outbox
from shared.jobs import purge_idempotency_keys, stale_partitions
from shared.partitions import HISTORY_QUEUE
from workers.base import Runtime

log = logging.getLogger(__name__)


def sweep_pending_jobs(rt: Runtime) -> list[str]:
    """Wake every partition holding a job PENDING longer than ``SWEEP_AFTER_SECONDS``.

    The broker may have lost the wake-up (a restart without its data, a publish
    that failed after commit, a worker killed holding the message: celery#4976),
    so the job rows, not the messages, decide what is re-sent.
    """
    with rt.session_factory() as session:
        queues = stale_partitions(session, dt.timedelta(seconds=rt.settings.sweep_after_seconds))
    for queue in queues:
        # A wake-up already waiting in the queue will do; while the worker is down,
        # re-sending every interval would only pile up messages.
        if rt.backlog(queue) == 0:
            rt.force_wake(queue)
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


def purge_expired_idempotency_keys(rt: Runtime) -> int:
    with rt.session_factory() as session, session.begin():
        return purge_idempotency_keys(
            session, dt.timedelta(seconds=rt.settings.idempotency_ttl_seconds)
        )
