"""One engine per process and the one ``sessionmaker``.

Engines are built by the process's factory (``create_app`` or the worker's task
base) after any fork, never at import.  Whoever opens a session commits it;
nothing else in ``shared`` commits, rolls back or closes.
"""

from __future__ import annotations

from sqlalchemy import Engine, create_engine
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
) -> Engine:
    """The process's engine for the primary (or ``url``, e.g. the replica).

    ``pre_ping`` costs a round trip per checkout: workers keep it (one per batch);
    web turns it off, because a dead connection already fails that one request as
    a 503 and SQLAlchemy then invalidates the pool's older connections.
    """
    options = (
        f"-c statement_timeout={settings.db_statement_timeout_ms}"
        f" -c lock_timeout={settings.db_lock_timeout_ms}"
        " -c timezone=UTC"
    )
    return create_engine(
        url or settings.sqlalchemy_url,
        isolation_level=ISOLATION_LEVEL,
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
