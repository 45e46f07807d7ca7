"""One engine per process and the one ``sessionmaker``.

Engines are built by the process's factory (``create_app`` or the worker's task
base) after any fork, never at import.  Whoever opens a session commits it;
nothing else in ``shared`` commits, rolls back or closes.
"""

from __future__ import annotations

import datetime as dt
import select
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
import psycopg.errors
from psycopg.abc import PQGen
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from shared.config import Settings

# READ COMMITTED is what the guarded UPDATEs and row locks are written for: a
# waiting UPDATE re-reads the committed row and re-checks its WHERE clause.
ISOLATION_LEVEL = "READ COMMITTED"

RV = TypeVar("RV")
# psycopg's own poll interval while it waits (its Ctrl-C check), kept.
_WAIT_INTERVAL = 0.1


# How long a connection keeps the plans PostgreSQL made for its prepared statements
# (``refresh_stale_plans``).
PLAN_LIFETIME_SECONDS = 5.0
_DISCARD_PLANS = text("DISCARD PLANS")


def refresh_stale_plans(
    session: Session,
    lifetime: float = PLAN_LIFETIME_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """Drop the plans the session's connection has kept for ``lifetime`` seconds or more;
    whether it did.

    psycopg prepares a statement run often, and PostgreSQL then keeps one generic plan
    for it until the tables' statistics change.  A plan made while a table was nearly
    empty (a new day's job partition, a new shop's orders) scans it whole, and goes on
    scanning it as it grows until autovacuum first analyzes it, a minute or more later.
    Dropped every few seconds, the plans are made again from the tables' size then:
    one ``DISCARD PLANS`` per connection every ``lifetime`` seconds (the prepared
    statements stay prepared).
    """
    info = session.connection().info
    now = clock()
    made = info.setdefault("plans_made_at", now)
    if now - made < lifetime:
        return False
    session.execute(_DISCARD_PLANS)
    info["plans_made_at"] = now
    return True


def make_engine(
    settings: Settings,
    *,
    url: str | None = None,
    pool_size: int | None = None,
    pre_ping: bool = True,
    isolation_level: str = ISOLATION_LEVEL,
    client_timeout: float | None = None,
) -> Engine:
    """The process's engine for the primary (or ``url``, e.g. the replica).

    ``pre_ping`` costs a round trip per checkout; web and workers turn it off and
    rely on ``_discard_dropped`` instead, which costs none.  ``client_timeout``
    (seconds, default ``DB_CLIENT_TIMEOUT_MS``) bounds each wait for an answer of the
    server (``BoundedConnection``); workers pass ``worker_client_timeout``.
    """
    options = (
        f"-c statement_timeout={settings.db_statement_timeout_ms}"
        f" -c lock_timeout={settings.db_lock_timeout_ms}"
        f" -c idle_in_transaction_session_timeout={settings.db_idle_in_transaction_timeout_ms}"
        f"{server_keepalive_options(settings)}"
        " -c timezone=UTC"
    )
    engine = create_engine(
        url or settings.sqlalchemy_url,
        isolation_level=isolation_level,
        pool_size=pool_size or settings.db_pool_size,
        max_overflow=settings.db_pool_size,
        pool_pre_ping=pre_ping,
        pool_recycle=1800,
        # A request does not queue for a connection longer than it would wait for an
        # answer (SQLAlchemy's default is 30 s): with the server frozen, every pooled
        # connection is stuck until its own bound, and the next request answers 503.
        pool_timeout=settings.db_client_timeout_ms / 1000,
        connect_args={
            "connect_timeout": settings.db_connect_timeout_seconds,
            "options": options,
            "application_name": f"shop-{settings.app_env.value}",
            **client_keepalive_args(settings),
        },
    )
    _bound_answers(
        engine, settings.db_client_timeout_ms / 1000 if client_timeout is None else client_timeout
    )
    event.listen(engine, "checkout", _discard_dropped)
    return engine


# Allowed clock difference between web and PostgreSQL, and the time from the server
# checking a job INSERT's deadline to its commit.
DEADLINE_MARGIN = dt.timedelta(milliseconds=500)


def write_deadline(settings: Settings) -> dt.datetime:
    """The deadline of a job INSERT sent now (``shared.jobs.record_many``): web stops
    waiting for the answer after ``DB_CLIENT_TIMEOUT_MS``, so a server that receives the
    statement later must not write the row of a request answered 503."""
    return (
        dt.datetime.now(dt.UTC)
        + dt.timedelta(milliseconds=settings.db_client_timeout_ms)
        - DEADLINE_MARGIN
    )


def worker_client_timeout(settings: Settings) -> float:
    """A worker's bound on one answer: its statements may run up to the server's
    ``statement_timeout``, which should fire first (a clean error, the connection kept)."""
    return (settings.db_statement_timeout_ms + settings.db_client_timeout_ms) / 1000


def client_keepalive_args(settings: Settings) -> dict[str, int]:
    """libpq's TCP keepalives and ``tcp_user_timeout``: a server behind a blackhole is
    given up in seconds instead of the kernel's two hours (keepalives, when the connection
    is idle) or fifteen minutes of retransmissions (``tcp_user_timeout``, when it is not)."""
    return {
        "keepalives": 1,
        "keepalives_idle": settings.tcp_keepalive_idle_seconds,
        "keepalives_interval": settings.tcp_keepalive_interval_seconds,
        "keepalives_count": settings.tcp_keepalive_count,
        "tcp_user_timeout": settings.tcp_user_timeout_ms,
    }


def server_keepalive_options(settings: Settings) -> str:
    """The same bounds for the server's end of each session (``-c`` options; any user
    may set them): the server drops a client behind a blackhole, and with its session
    the partition lock and row locks it held, even on a server whose own
    postgresql.conf keeps the kernel defaults."""
    return (
        f" -c tcp_keepalives_idle={settings.tcp_keepalive_idle_seconds}"
        f" -c tcp_keepalives_interval={settings.tcp_keepalive_interval_seconds}"
        f" -c tcp_keepalives_count={settings.tcp_keepalive_count}"
        f" -c tcp_user_timeout={settings.tcp_user_timeout_ms}"
    )


class BoundedConnection(psycopg.Connection[Any]):
    """A psycopg connection that waits at most ``answer_timeout`` seconds for the server.

    psycopg waits for an answer without limit, and no TCP timer helps when the server
    process is frozen (SIGSTOP, a VM pause, a stall): its kernel still acknowledges
    every packet.  Every statement, COMMIT and ROLLBACK waits through ``wait``; past the
    bound the connection is closed (mid-protocol it cannot be reused), so SQLAlchemy
    sees a disconnect, invalidates it, and the caller gets an ``OperationalError``.
    """

    answer_timeout: float | None = None

    def wait(
        self, gen: PQGen[RV], interval: float = _WAIT_INTERVAL, timeout: float | None = None
    ) -> RV:
        if timeout is not None or self.answer_timeout is None:
            return super().wait(gen, interval, timeout)
        try:
            return super().wait(gen, interval, self.answer_timeout)
        except psycopg.errors._WaitTimeout as exc:
            self.pgconn.finish()
            raise psycopg.OperationalError(
                f"no answer from PostgreSQL within {self.answer_timeout:g} s: connection closed"
            ) from exc


def _bound_answers(engine: Engine, seconds: float) -> None:
    @event.listens_for(engine, "do_connect")
    def connect(_dialect: Any, _record: Any, cargs: Any, cparams: Any) -> BoundedConnection:
        connection = BoundedConnection.connect(*cargs, **cparams)
        connection.answer_timeout = seconds
        return connection


def _discard_dropped(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """A pooled connection the server has dropped is not handed out.

    An idle connection has nothing to read unless the server ended it (after a restart
    or a shutdown it sends a FATAL, then closes): one non-blocking poll of its socket,
    no round trip, tells.  Raising DisconnectionError makes the pool discard it and
    check out another (SQLAlchemy's documented checkout hook), so the first request
    after a database restart is not answered 503 by a stale connection of its pool.
    """
    try:
        readable, _, _ = select.select([dbapi_connection.pgconn.socket], [], [], 0)
    except Exception as exc:  # its socket is gone already (psycopg raises, or select does)
        raise DisconnectionError("connection closed by the server") from exc
    if readable:
        raise DisconnectionError("connection closed by the server")


def make_probe_engine(settings: Settings, url: str, name: str) -> Engine:
    """One autocommit connection to ``url`` for a periodic probe (the replica lag check),
    apart from the request pools, with a short statement timeout: a server that hangs
    stalls the probe, never a request.  ``name`` goes into ``application_name``."""
    engine = create_engine(
        url,
        isolation_level="AUTOCOMMIT",
        pool_size=1,
        max_overflow=0,
        pool_pre_ping=False,
        pool_recycle=1800,
        pool_timeout=2,
        connect_args={
            "connect_timeout": settings.db_connect_timeout_seconds,
            "options": "-c statement_timeout=1000 -c timezone=UTC"
            + server_keepalive_options(settings),
            "application_name": f"shop-{settings.app_env.value}-{name}",
            **client_keepalive_args(settings),
        },
    )
    _bound_answers(engine, 2.0)  # past its statement_timeout: the server is not answering
    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=True)
