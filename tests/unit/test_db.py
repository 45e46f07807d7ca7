"""shared/db.py: the pool hands out no connection the server has dropped; a connection's
plans are dropped once they are older than their lifetime."""

from __future__ import annotations

import psycopg
from sqlalchemy import event, text
from sqlalchemy.orm import Session

from shared.config import Settings
from shared.db import make_engine, refresh_stale_plans


def test_a_connection_the_server_ended_is_replaced_at_checkout(settings: Settings) -> None:
    engine = make_engine(settings, pool_size=1, pre_ping=False)
    try:
        with engine.connect() as connection:
            pid = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
        # The pooled connection is ended by the server, as a restart would end it.
        with psycopg.connect(settings.database_url, autocommit=True) as admin:
            assert admin.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
            while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone():
                pass  # terminated asynchronously: wait until it is gone
        with engine.connect() as connection:  # no error: a fresh connection is handed out
            assert connection.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid
    finally:
        engine.dispose()


def test_a_connection_drops_its_plans_once_they_are_older_than_their_lifetime(
    settings: Settings,
) -> None:
    engine = make_engine(settings, pool_size=1, pre_ping=False)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    now = [100.0]
    try:
        for advance, dropped in ((0.0, False), (4.9, False), (0.1, True), (1.0, False)):
            now[0] += advance
            with Session(engine) as session, session.begin():
                # Inside the drain's transaction, as workers.base.apply_next_batch asks.
                assert refresh_stale_plans(session, 5.0, clock=lambda: now[0]) is dropped
                session.execute(text("SELECT 1"))
        assert statements.count("DISCARD PLANS") == 1
    finally:
        engine.dispose()
