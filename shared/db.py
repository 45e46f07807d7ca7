"""One engine per process and the one ``sessionmaker``.

Engines are built by the process's factory (``create_app`` or the worker's task
base) after any fork, never at import.  Whoever opens a session commits it;
nothing else in ``shared`` commits, rolls back or closes.
"""

from __future__ import annotations

import select
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from shared.config import Settings

# READ COMMITTED is what the guarded UPDATEs and row locks are written for: a
# waiting UPDATE re-reads the committed row and re-checks its WHERE clause.
ISOLATION_LEVEL = "READ COMMITTED"


def make_engine(
    settings: Settings,
    *,
    url: str | None = None,
    pool_size: int | None = None,
    pre_ping: bool = True,
    isolation_level: str = ISOLATION_LEVEL,
) -> Engine:
    """The process's engine for the primary (or ``url``, e.g. the replica).

    ``pre_ping`` costs a round trip per checkout; web and workers turn it off and
    rely on ``_discard_dropped`` instead, which costs none.
    """
    options = (
        f"-c statement_timeout={settings.db_statement_timeout_ms}"
        f" -c lock_timeout={settings.db_lock_timeout_ms}"
        " -c timezone=UTC"
    )
    engine = create_engine(
        url or settings.sqlalchemy_url,
        isolation_level=isolation_level,
        pool_size=pool_size or settings.db_pool_size,
        max_overflow=settings.db_pool_size,
        pool_pre_ping=pre_ping,
        pool_recycle=1800,
        connect_args={
            "connect_timeout": settings.db_connect_timeout_seconds,
            "options": options,
            "application_name": f"shop-{settings.app_env.value}",
        },
    )
    event.listen(engine, "checkout", _discard_dropped)
    return engine


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
    return create_engine(
        url,
        isolation_level="AUTOCOMMIT",
        pool_size=1,
        max_overflow=0,
        pool_pre_ping=False,
        pool_recycle=1800,
        connect_args={
            "connect_timeout": settings.db_connect_timeout_seconds,
            "options": "-c statement_timeout=1000 -c timezone=UTC",
            "application_name": f"shop-{settings.app_env.value}-{name}",
        },
    )


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=True)
