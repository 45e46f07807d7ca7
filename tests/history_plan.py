"""The plans of the history reads with 1,000,000 rows in each partitioned table.

    python -m shared.embedded up --run-dir .run/test -- python -m tests.history_plan

Builds a scratch database (migrated to head), makes the monthly partitions of the last
twelve months (``shared.table_partitions``, as beat makes them ahead), fills it with
400,000 orders spread over those months and their ~1,000,000 ``order_histories`` rows,
and 1,000,000 ``point_histories`` rows of 50,000 users, then prints
``EXPLAIN (ANALYZE, BUFFERS)`` of the very statements the API runs:
``GET /v1/orders/{id}/histories`` (``order_histories_query``) for a recent and an old
order, once planned with the id and once as a generic prepared plan (what psycopg's
prepared statements get after a few runs), and ``GET /v1/points/{userId}/histories``
(the count and ``point_histories_query``).  The database is dropped after.
"""

from __future__ import annotations

import sys
import time
import uuid

from sqlalchemy import Select, create_engine, func, select, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from shared.config import Settings, to_sqlalchemy_url
from shared.domain.orders import order_histories_query
from shared.domain.points import point_histories_query
from shared.embedded import migrate
from shared.models import PointHistory
from shared.table_partitions import add_months, ensure_month_partitions, month_start
from tests.databases import scratch_database

ORDERS = 400_000
POINT_ROWS = 1_000_000
USERS = 50_000

FILL = [
    "SET synchronous_commit = off",
    # The guard keys are written in bulk below, not row by row by the triggers.
    "ALTER TABLE order_histories DISABLE TRIGGER USER",
    "ALTER TABLE point_histories DISABLE TRIGGER USER",
    f"INSERT INTO orders (user_id, status, total_price, created_at, updated_at)"
    f" SELECT 1 + g % {USERS}, 'READY', 100, t, t FROM (SELECT g,"
    f" now() - interval '360 days' * (1 - g::float8 / {ORDERS}) AS t"
    f" FROM generate_series(1, {ORDERS}) g) s",
    # READY for every order; PAYMENT_READY for 3 in 4, then COMPLETED for 2 in 4 and
    # FAILED for the rest of those: about 2.5 history rows per order.
    "INSERT INTO order_histories (order_id, status, created_at)"
    " SELECT o.id, s.status, o.created_at + s.after FROM orders o"
    " JOIN (VALUES ('READY', interval '0', 0), ('PAYMENT_READY', interval '2 minutes', 1),"
    " ('COMPLETED', interval '5 minutes', 2), ('FAILED', interval '9 minutes', 3)) AS"
    " s(status, after, step) ON s.step = 0 OR (o.id % 4 <> 0 AND"
    " (s.step = 1 OR (s.step = 2 AND o.id % 4 IN (1, 2)) OR (s.step = 3 AND o.id % 4 = 3)))"
    " ORDER BY o.created_at + s.after",
    "INSERT INTO order_history_keys (order_id, status)"
    " SELECT order_id, status FROM order_histories",
    f"INSERT INTO point_histories (user_id, type, amount, balance_after, job_id, created_at)"
    f" SELECT 1 + g % {USERS}, 'CHARGE', 10, 10 * (1 + g / {USERS}), gen_random_uuid(),"
    f" now() - interval '360 days' * (1 - g::float8 / {POINT_ROWS})"
    f" FROM generate_series(1, {POINT_ROWS}) g",
    "INSERT INTO point_history_keys (history_id, job_id) SELECT id, job_id FROM point_histories",
    "ALTER TABLE order_histories ENABLE TRIGGER USER",
    "ALTER TABLE point_histories ENABLE TRIGGER USER",
    "VACUUM ANALYZE",
]


def sql_of(statement: Select[object]) -> str:
    return str(
        statement.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})
    )


def explain(session: Session, title: str, sql: str) -> None:
    print(f"\n-- {title}\n{sql}")
    for (line,) in session.execute(text(f"EXPLAIN (ANALYZE, BUFFERS) {sql}")):
        print(line)


def main() -> int:
    settings = Settings.from_env()
    with scratch_database(settings.database_url, f"plan_{uuid.uuid4().hex[:8]}") as url:
        migrate(url)
        started = time.monotonic()
        with Session(create_engine(to_sqlalchemy_url(url))) as session, session.begin():
            now = session.execute(select(func.now())).scalar_one()
            for n in range(-12, 0):
                month = add_months(month_start(now), n)
                ensure_month_partitions(session, now=month, months_ahead=0)
        engine = create_engine(to_sqlalchemy_url(url), isolation_level="AUTOCOMMIT")
        with Session(engine) as session:
            for statement in FILL:
                session.execute(text(statement))
            counts = session.execute(
                text(
                    "SELECT (SELECT count(*) FROM order_histories),"
                    " (SELECT count(*) FROM point_histories), (SELECT count(*) FROM orders),"
                    " (SELECT count(*) FROM pg_inherits"
                    "  WHERE inhparent = 'order_histories'::regclass),"
                    " (SELECT count(*) FROM order_histories_default)"
                )
            ).one()
            print(
                f"-- {counts[0]:,} order_histories rows, {counts[1]:,} point_histories rows,"
                f" {counts[2]:,} orders; {counts[3]} partitions per table,"
                f" {counts[4]} rows in the default one"
                f" (filled in {time.monotonic() - started:.0f} s)"
            )
            recent, old = session.execute(text("SELECT max(id), min(id) + 1000 FROM orders")).one()
            for label, order_id in (("a recent order", recent), ("an order of 11 months ago", old)):
                explain(
                    session,
                    f"GET /v1/orders/{order_id}/histories ({label})",
                    sql_of(order_histories_query(order_id)),
                )
            generic = sql_of(order_histories_query(424242)).replace("424242", "$1")
            session.execute(text("SET plan_cache_mode = force_generic_plan"))
            session.execute(text(f"PREPARE histories(bigint) AS {generic}"))
            explain(
                session,
                f"the same as a generic prepared plan (order {old}): pruned when it runs",
                f"EXECUTE histories({old})",
            )
            session.execute(text("RESET plan_cache_mode"))
            user = 4242
            count = (
                select(func.count()).select_from(PointHistory).where(PointHistory.user_id == user)
            )
            explain(session, f"GET /v1/points/{user}/histories: the total", sql_of(count))
            for page in (1, 2):
                explain(
                    session,
                    f"GET /v1/points/{user}/histories?page={page}",
                    sql_of(point_histories_query(user, page=page, size=20)),
                )
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
