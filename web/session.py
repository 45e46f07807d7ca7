"""Database sessions of a request: opened on first use, closed at teardown.

Where each read goes (README, "Reads: primary or replica"):

* ``db_session()``: the primary, in a transaction (writes; job rows go through
  ``autocommit()``, job status reads too).
* ``primary_read_session()``: the primary, one statement at a time (autocommit, so a
  read costs no BEGIN/ROLLBACK round trips): every read API.md promises reflects a
  SUCCEEDED job at once (a product, a balance, a coupon's counts, an order...).
* ``lagging_read(read, max_lag=...)``: a replica that has replayed every commit older
  than ``max_lag`` seconds (``shared.replicas``), else the primary: reads API.md lets
  lag (listings within 1 s, order history within 2 s, the best sellers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from flask import Flask, current_app, g
from prometheus_client import Counter
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from shared.domain.errors import NotFound
from shared.replicas import ReplicaSet

T = TypeVar("T")

log = logging.getLogger(__name__)

# How far behind (seconds) each read that may lag may be; REPLICA_MAX_LAG_MS caps them all.
# API.md: "listings within 1 s" of a job's SUCCEEDED.
LISTINGS_MAX_LAG = 1.0
# API.md: "order history within 2 s"; the history listener's own delay (its linger, a
# drain) has the other second.
ORDER_HISTORY_MAX_LAG = 1.0

LAGGING_READS = Counter(
    "lagging_reads_total", "Reads that may lag, by the server that answered", ["server"]
)


def db_session() -> Session:
    session: Session | None = g.get("db_session")
    if session is None:
        session = current_app.extensions["session_factory"]()
        g.db_session = session
    return session


@contextmanager
def autocommit() -> Iterator[Connection]:
    """A primary connection on which each statement is its own transaction.

    Each statement is committed (and flushed to the WAL: ``synchronous_commit`` stays
    on) before its answer comes back, so a job row is recorded in one round trip
    instead of three (BEGIN, INSERT, COMMIT), and job status is read without opening
    a transaction.  In production the connection comes from the app's autocommit
    engine.  Tests inject a session factory bound to their own transaction: the
    block then runs on a session that is committed (a savepoint) when it ends.
    Either way no connection is held once the block is left.
    """
    engine: Engine | None = current_app.extensions.get("autocommit_engine")
    if engine is not None:
        with engine.connect() as connection:
            yield connection
        return
    session = db_session()
    try:
        yield session.connection()
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def primary_read_session() -> Session:
    """The primary for reads that must reflect every SUCCEEDED job: a session on the
    primary's autocommit engine (the request's own session when tests inject one)."""
    factory = current_app.extensions.get("primary_read_factory")
    if factory is None:
        return db_session()
    session: Session | None = g.get("primary_read_session")
    if session is None:
        session = factory()
        g.primary_read_session = session
    return session


def lagging_read(read: Callable[[Session], T], *, max_lag: float) -> tuple[T, float]:
    """``read`` on a replica that has replayed every commit older than ``max_lag`` seconds
    (in turn), else on the primary: its result, and how many seconds its data may be
    behind (0 on the primary).

    A replica that fails the read (down, restarting, a query cancelled by a recovery
    conflict) is never the client's problem: the read runs again on the primary, and a
    replica that did not answer is skipped until its next check.  A ``NotFound`` there
    is asked of the primary too (the row may be younger than the replica's lag).
    """
    replicas: ReplicaSet | None = current_app.extensions.get("replicas")
    picked = replicas.pick(max_lag) if replicas is not None else None
    if replicas is not None and picked is not None:
        replica, behind = picked
        try:
            with replica.sessions() as session:
                result = read(session)
        except NotFound:
            pass
        except DBAPIError as exc:
            if exc.connection_invalidated or getattr(exc.orig, "sqlstate", None) is None:
                replicas.mark_down(replica, f"a read failed: {exc.orig}")
            else:
                log.info(
                    "replica %s refused a read (%s): read from the primary", replica.name, exc.orig
                )
        else:
            LAGGING_READS.labels(replica.name).inc()
            return result, behind
    LAGGING_READS.labels("primary").inc()
    return read(primary_read_session()), 0.0


def install_sessions(app: Flask) -> None:
    @app.teardown_appcontext
    def close_sessions(_exc: BaseException | None) -> None:
        for name in ("db_session", "primary_read_session"):
            session: Session | None = g.pop(name, None)
            if session is not None:
                session.close()
