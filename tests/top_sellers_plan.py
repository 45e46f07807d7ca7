"""The plan of the best-seller ranking with 1,000,000 order lines, in a scratch database.

    python -m shared.embedded up --run-dir .run/test -- python -m tests.top_sellers_plan [PRODUCTS]

Builds a scratch database (migrated to head), fills it with PRODUCTS (10,000) products and
500,000 orders of two lines each spread over the last 30 days (skewed towards a
few products, one order in ten FAILED), builds ``product_sales`` from them as the
workers keep it (the migration's backfill statement), then prints
``EXPLAIN (ANALYZE, BUFFERS)`` of the very statement ``GET /v1/products/top`` runs
(``shared.domain.sales.ranking_query``) for 3 and 30 days, and, for comparison, of
the same ranking computed from ``order_lines``.  The database is dropped after.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
import uuid

from sqlalchemy import create_engine, text
from sqlalchemy.dialects import postgresql

from shared.config import Settings, to_sqlalchemy_url
from shared.domain.sales import ranking_query, window_start
from shared.embedded import migrate
from tests.databases import scratch_database

ORDERS = 500_000  # two lines each: 1,000,000 order lines


def fill(products: int) -> list[str]:
    return [
        "SET synchronous_commit = off",
        f"INSERT INTO products (name, price, stock) SELECT 'product ' || g, 100 + g % 900, 1000"
        f" FROM generate_series(1, {products}) g",
        # created_at spread over 30 days; status: 10 % FAILED, the rest READY or COMPLETED.
        f"INSERT INTO orders (user_id, status, total_price, created_at, updated_at)"
        f" SELECT 1 + g % 100000, CASE WHEN g % 10 = 0 THEN 'FAILED'"
        f" WHEN g % 3 = 0 THEN 'COMPLETED' ELSE 'READY' END, 0, t, t"
        f" FROM (SELECT g, now() - random() * interval '30 days' AS t"
        f" FROM generate_series(1, {ORDERS}) g) s",
        # Two distinct products per order, skewed (random()^3) so that a ranking means something.
        f"INSERT INTO order_lines (order_id, product_id, quantity, unit_price)"
        f" SELECT o.id, o.a + k, 1 + (o.id + k) % 3, 100"
        f" FROM (SELECT id, 1 + floor(({products} - 1) * random() ^ 3)::bigint AS a FROM orders) o,"
        f" generate_series(0, 1) k",
        "INSERT INTO product_sales (hour, product_id, units)"
        " SELECT date_trunc('hour', o.created_at, 'UTC'), l.product_id, sum(l.quantity)"
        " FROM orders o JOIN order_lines l ON l.order_id = o.id"
        " WHERE o.status <> 'FAILED' GROUP BY 1, 2",
        # Workers append an hour's rows during that hour, so the table is in hour order;
        # the backfill above wrote them in hash order: put them back in time order.
        "CLUSTER product_sales USING pk_product_sales",
        "VACUUM ANALYZE",
    ]


# The same ranking from the order lines: what the aggregate saves on every refresh.
FROM_LINES = (
    "SELECT l.product_id, p.name, p.price, sum(l.quantity) AS units"
    " FROM order_lines l JOIN orders o ON o.id = l.order_id JOIN products p ON p.id = l.product_id"
    " WHERE o.created_at >= now() - interval '{days} days' AND o.status <> 'FAILED'"
    " GROUP BY l.product_id, p.name, p.price ORDER BY units DESC, l.product_id LIMIT 100"
)


def main(argv: list[str]) -> int:
    products = int(argv[0]) if argv else 10_000
    settings = Settings.from_env()
    name = f"plan_{uuid.uuid4().hex[:8]}"
    with scratch_database(settings.database_url, name) as url:
        migrate(url)
        engine = create_engine(to_sqlalchemy_url(url), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            started = time.monotonic()
            for statement in fill(products):
                conn.execute(text(statement))
            counts = conn.execute(
                text(
                    "SELECT (SELECT count(*) FROM order_lines), (SELECT count(*) FROM orders),"
                    " (SELECT count(*) FROM product_sales),"
                    " (SELECT count(DISTINCT product_id) FROM order_lines), now()"
                )
            ).one()
            print(
                f"-- {counts[0]:,} order lines, {counts[1]:,} orders, {counts[2]:,} product_sales"
                f" rows, {counts[3]:,} products sold (filled in {time.monotonic() - started:.0f} s)"
            )
            now: dt.datetime = counts[4]
            for days in (3, 30):
                statement = ranking_query(window_start(now, days), 100)
                sql = str(
                    statement.compile(
                        dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}
                    )
                )
                print(f"\n-- GET /v1/products/top?days={days} (limit 100 is what is cached)")
                print(sql)
                for (line,) in conn.execute(text("EXPLAIN (ANALYZE, BUFFERS) " + sql)):
                    print(line)
            for days in (3, 30):
                print(f"\n-- for comparison: the same ranking ({days} days) from order_lines")
                explain = "EXPLAIN (ANALYZE, BUFFERS) " + FROM_LINES.format(days=days)
                for (line,) in conn.execute(text(explain)):
                    print(line)
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
