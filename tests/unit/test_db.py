"""The engine's pool hands out no connection the server has dropped (shared/db.py)."""

from __future__ import annotations

import psycopg
from sqlalchemy import text

from shared.config import Settings
from shared.db import make_engine


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
