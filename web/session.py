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

    In production it comes from the app's autocommit engine (one round trip per
    statement).  Tests inject a session factory bound to their own transaction: the
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
