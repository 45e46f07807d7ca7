"""Alembic environment: metadata from ``shared.models``, one advisory lock per run.

The URL comes from ``config.attributes["database_url"]`` (set by
``shared.embedded.migrate``) or from ``DATABASE_URL`` through ``shared.config``.
"""

from __future__ import annotations

import re
from typing import Any

from alembic import context
from sqlalchemy import create_engine, pool, text

from shared.config import Settings, to_sqlalchemy_url
from shared.models import Base

# Two processes migrating at once run one after the other.
MIGRATION_LOCK_ID = 0x5E0B_0001

config = context.config
target_metadata = Base.metadata


# Not in the models, so left out of autogenerate and ``alembic check``: the monthly
# partitions of the history tables (created by the migration and ahead by beat, see
# shared.table_partitions), the time partitions of jobs and outbox (shared.retention)
# and the trigram index that exists only where the server has pg_trgm.
_PARTITION = re.compile(
    r"^((order_histories|point_histories)_(p[0-9]{6}|default)|(jobs|outbox)_(p[0-9]{14}|default))$"
)
_OPTIONAL_INDEXES = frozenset({"ix_products_name_trgm"})


def include_name(name: str | None, type_: str, _parent_names: dict[str, Any]) -> bool:
    if type_ == "table" and name is not None and _PARTITION.match(name):
        return False
    return not (type_ == "index" and name in _OPTIONAL_INDEXES)


def database_url() -> str:
    given = config.attributes.get("database_url")
    if given:
        return to_sqlalchemy_url(str(given))
    return Settings.from_env().sqlalchemy_url


def run_migrations_offline() -> None:
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        connection.execute(text("SET lock_timeout = '10s'"))
        connection.execute(text("SET statement_timeout = '120s'"))
        connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        connection.commit()
        try:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                compare_server_default=True,
                include_name=include_name,
                transaction_per_migration=True,
            )
            with context.begin_transaction():
                context.run_migrations()
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": MIGRATION_LOCK_ID})
            connection.commit()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
