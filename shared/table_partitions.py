"""Monthly partitions of the history tables, made ahead of the rows that need them.

``order_histories`` and ``point_histories`` are partitioned by range of ``created_at``:
one partition per UTC month, ``<table>_pYYYYMM``, plus ``<table>_default`` for a row
whose month has no partition yet (so an insert never fails for want of one).  Beat
calls ``ensure_month_partitions`` regularly; it creates this month's partition and
the next ``MONTHS_AHEAD`` months' when they are missing.  Old partitions are kept.

A partition is created as a plain table and then attached: ``ATTACH PARTITION``
takes only a SHARE UPDATE EXCLUSIVE lock on the parent, so inserts and reads of the
history go on while it runs (``CREATE TABLE ... PARTITION OF`` would take an ACCESS
EXCLUSIVE lock and queue every insert behind it).  Rows that landed in the default
partition for that month are moved into the new table first (attaching would
otherwise fail); their guard keys (``order_history_keys``, ``point_history_keys``)
stay, because the history triggers leave the keys of rows being moved alone.
"""

from __future__ import annotations

import datetime as dt
import re

from sqlalchemy import text
from sqlalchemy.orm import Session

PARTITIONED_TABLES = ("order_histories", "point_histories")
MONTHS_AHEAD = 3
# Two beats (or a beat and an operator) creating the same month take turns.
_LOCK_ID = 0x5E0B_0002
_NAME = re.compile(r"^[a-z_]+$")


def month_start(moment: dt.datetime) -> dt.datetime:
    """The start of the UTC month containing ``moment``."""
    utc = moment.astimezone(dt.UTC)
    return utc.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def add_months(month: dt.datetime, n: int) -> dt.datetime:
    index = month.year * 12 + month.month - 1 + n
    return month.replace(year=index // 12, month=index % 12 + 1)


def partition_name(table: str, month: dt.datetime) -> str:
    return f"{table}_p{month:%Y%m}"


def list_partitions(session: Session, table: str) -> list[str]:
    """The names of ``table``'s partitions (the default one included), sorted."""
    return sorted(
        session.execute(
            text(
                "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = CAST(:table AS regclass)"
            ),
            {"table": table},
        ).scalars()
    )


def ensure_month_partitions(
    session: Session, *, now: dt.datetime | None = None, months_ahead: int = MONTHS_AHEAD
) -> list[str]:
    """Create the missing partitions of this month and the next ``months_ahead`` months
    of every history table; returns the names created.

    Runs in the caller's transaction under a transaction-scoped advisory lock (two
    callers create a month once), with a short ``lock_timeout`` so that it gives up,
    rather than queue, behind a long DDL or VACUUM (the next run tries again).
    """
    session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
    session.execute(text("SET LOCAL lock_timeout = '2s'"))
    if now is None:
        now = session.execute(text("SELECT now()")).scalar_one()
    first = month_start(now)
    created: list[str] = []
    for table in PARTITIONED_TABLES:
        existing = set(list_partitions(session, table))
        for n in range(months_ahead + 1):
            month = add_months(first, n)
            name = partition_name(table, month)
            if name not in existing:
                _create_partition(session, table, name, month, add_months(month, 1))
                created.append(name)
    return created


def _create_partition(
    session: Session, table: str, name: str, lower: dt.datetime, upper: dt.datetime
) -> None:
    if not (_NAME.match(table) and re.match(r"^[a-z_]+_p[0-9]{6}$", name)):
        raise ValueError(f"unexpected partition name {name!r} of {table!r}")
    bounds = {"lower": lower, "upper": upper}
    session.execute(
        text(f"CREATE TABLE {name} (LIKE {table} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
    )
    # Rows of this month that arrived before its partition existed (beat was away).
    session.execute(text("SET LOCAL shop.moving_partition_rows = 'on'"))
    session.execute(
        text(
            f"WITH moved AS (DELETE FROM {table}_default"  # noqa: S608 (names checked above)
            " WHERE created_at >= :lower AND created_at < :upper RETURNING *)"
            f" INSERT INTO {name} SELECT * FROM moved"
        ),
        bounds,
    )
    session.execute(text("SET LOCAL shop.moving_partition_rows = 'off'"))
    lower_sql, upper_sql = (
        session.execute(
            text("SELECT quote_literal(CAST(:b AS timestamptz))"), {"b": b}
        ).scalar_one()
        for b in (lower, upper)
    )
    session.execute(
        text(
            f"ALTER TABLE {table} ATTACH PARTITION {name}"
            f" FOR VALUES FROM ({lower_sql}) TO ({upper_sql})"
        )
    )
