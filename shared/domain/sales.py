"""Best sellers: units ordered per product per UTC hour, kept as orders come and fail.

``product_sales`` is an aggregate written in the transactions that take and give
back stock, never a scan of ``order_lines`` per request: an order adds its units
to the hour it was created in (``count_sales``), an order moved to FAILED takes
them out of that same hour (``uncount_sales``), so the aggregate always equals the
units of the orders that are not FAILED, per product and creation hour.  Both run
while the order's product rows are locked (ascending id), so no two transactions
ever contend for an aggregate row in an order of their own.

The ranking sums the hours of the window.  Hourly buckets make the window
``days * 24`` hours exact to the hour: it starts at the top of the UTC hour that
contains ``now - days * 24 h`` (so it spans between ``days * 24`` and
``days * 24 + 1`` hours) and reads at most ``days * 24 + 1`` rows per product.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import ColumnElement, Select, Table, func, literal_column, select, text, update
from sqlalchemy.orm import Session

from shared.models import Order, OrderLine, Product, ProductSales

# The hour bucket of a timestamp, in UTC whatever the session's time zone.
_THIS_HOUR: ColumnElement[dt.datetime] = literal_column("date_trunc('hour', now(), 'UTC')")

_sales = cast(Table, ProductSales.__table__)


# One upsert for a batch, its rows as array parameters (compiled once, whatever the size).
_COUNT_SALES = text(
    """
    INSERT INTO product_sales (hour, product_id, units)
    SELECT date_trunc('hour', now(), 'UTC'), sold.product_id, sold.units
    FROM unnest(CAST(:product_ids AS bigint[]), CAST(:units AS bigint[]))
         AS sold(product_id, units)
    ORDER BY sold.product_id
    ON CONFLICT (hour, product_id) DO UPDATE SET units = product_sales.units + excluded.units
    """
)


def count_sales(session: Session, units: dict[int, int]) -> None:
    """Add ``units`` (product id -> units ordered now) to the current hour.

    Call with the products' rows locked, as placing the orders does: one upsert for
    the batch, rows in ascending product id.
    """
    if not units:
        return
    ordered = sorted(units.items())
    session.execute(
        _COUNT_SALES,
        {"product_ids": [pid for pid, _ in ordered], "units": [n for _, n in ordered]},
    )


def uncount_sales(session: Session, order_id: int) -> None:
    """Take an order's units out of the hour it was created in (it moved to FAILED).

    ``ck_product_sales_units_non_negative`` refuses taking out more than was counted.
    """
    hour = func.date_trunc(text("'hour'"), Order.created_at, text("'UTC'"))
    session.execute(
        update(ProductSales)
        .where(
            OrderLine.order_id == order_id,
            Order.id == order_id,
            ProductSales.product_id == OrderLine.product_id,
            ProductSales.hour == hour,
        )
        .values(units=ProductSales.units - OrderLine.quantity)
        .execution_options(synchronize_session=False)
    )


@dataclass(frozen=True)
class TopSeller:
    product_id: int
    name: str
    price: int
    units_sold: int


@dataclass(frozen=True)
class TopSellers:
    items: list[TopSeller]
    days: int
    generated_at: dt.datetime


def window_start(now: dt.datetime, days: int) -> dt.datetime:
    """The first hour bucket of the last ``days * 24`` hours (see the module docstring)."""
    start = (now - dt.timedelta(days=days)).astimezone(dt.UTC)
    return start.replace(minute=0, second=0, microsecond=0)


def ranking_query(since: dt.datetime, limit: int) -> Select[tuple[int, str, int, Any]]:
    """The ranking's one statement: a range scan of the window's hours, grouped per
    product, the top ``limit`` taken before the products are joined."""
    units = func.sum(ProductSales.units).label("units")
    ranked = (
        select(ProductSales.product_id, units)
        .where(ProductSales.hour >= since)
        .group_by(ProductSales.product_id)
        .having(units > 0)
        .order_by(units.desc(), ProductSales.product_id)
        .limit(limit)
        .subquery("ranked")
    )
    return (
        select(ranked.c.product_id, Product.name, Product.price, ranked.c.units)
        .join(Product, Product.id == ranked.c.product_id)
        .order_by(ranked.c.units.desc(), ranked.c.product_id)
    )


def top_sellers(session: Session, *, days: int, limit: int) -> TopSellers:
    """The products with the most units in orders created in the window and not FAILED,
    most first, ties by product id, only those with units > 0 (current name and price).

    Reads the aggregate (``ranking_query``), never ``order_lines``.
    """
    now: dt.datetime = session.execute(select(func.now())).scalar_one()
    rows = session.execute(ranking_query(window_start(now, days), limit))
    items = [TopSeller(r.product_id, r.name, r.price, int(r.units)) for r in rows]
    return TopSellers(items, days, now)
