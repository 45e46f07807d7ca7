"""One database session per request, opened on first use and closed at teardown."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from flask import Flask, current_app, g
from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session


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


def read_session() -> Session:
    """A session for reads that may lag (the replica when one is configured)."""
    factory = current_app.extensions.get("replica_session_factory")
    if factory is None:
        return db_session()
    session: Session | None = g.get("read_session")
    if session is None:
        session = factory()
        g.read_session = session
    return session


def install_sessions(app: Flask) -> None:
    @app.teardown_appcontext
    def close_sessions(_exc: BaseException | None) -> None:
        for name in ("db_session", "read_session"):
            session: Session | None = g.pop(name, None)
            if session is not None:
                session.close()
