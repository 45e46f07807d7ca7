"""Products and their stock: never negative, changed only by guarded SQL."""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

from sqlalchemy import BigInteger, ColumnElement, Table, bindparam, func, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import InstrumentedAttribute, Session

from shared.domain.errors import NotFound
from shared.formats import rfc3339
from shared.models import Product, ProductTotal


class ProductSort(enum.StrEnum):
    ID = "id"
    NAME = "name"
    PRICE = "price"
    CREATED_AT = "createdAt"


_SORT_COLUMNS: dict[ProductSort, InstrumentedAttribute[Any]] = {
    ProductSort.ID: Product.id,
    ProductSort.NAME: Product.name,
    ProductSort.PRICE: Product.price,
    ProductSort.CREATED_AT: Product.created_at,
}


@dataclass(frozen=True)
class ProductQuery:
    name: str | None = None
    min_price: int | None = None
    max_price: int | None = None
    in_stock: bool | None = None
    sort: ProductSort = ProductSort.ID
    descending: bool = False
    page: int = 1
    size: int = 20


def product_document(product: Product) -> dict[str, Any]:
    """The product as API.md shows it (also the cached value and the STOCK_SET result)."""
    return {
        "id": product.id,
        "name": product.name,
        "price": product.price,
        "stock": product.stock,
        "createdAt": rfc3339(product.created_at),
        "updatedAt": rfc3339(product.updated_at),
    }


def create_product(session: Session, *, name: str, price: int, stock: int) -> Product:
    product = Product(name=name, price=price, stock=stock)
    session.add(product)
    session.flush()  # to obtain the generated id and server-side timestamps
    session.refresh(product)
    return product


def get_product(session: Session, product_id: int) -> Product:
    """Raises ``NotFound``."""
    product = session.get(Product, product_id)
    if product is None:
        raise NotFound(f"product {product_id} does not exist")
    return product


# A filtered listing's total is counted exactly up to this many matches; past it, the
# planner's estimate (at least this many + 1) stands in for a count of every match.
EXACT_TOTAL_LIMIT = 10_000


def list_products(session: Session, query: ProductQuery) -> tuple[list[ProductRow], int]:
    """One page of products matching ``query``, ties broken by id, and the total.

    The total of an unfiltered listing is ``product_totals`` (kept by triggers: one row
    read, exact); a filtered one is counted up to ``EXACT_TOTAL_LIMIT`` matches, past
    which it is the planner's estimate (never below what the pages show).  A
    case-insensitive ``name`` search uses the trigram index where ``pg_trgm`` gave one
    (the migration creates it when the server has the extension), else it scans.
    """
    conditions: list[ColumnElement[bool]] = []
    if query.name:
        pattern = (
            "%" + query.name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        )
        conditions.append(Product.name.ilike(pattern, escape="\\"))
    if query.min_price is not None:
        conditions.append(Product.price >= query.min_price)
    if query.max_price is not None:
        conditions.append(Product.price <= query.max_price)
    if query.in_stock is True:
        conditions.append(Product.stock > 0)
    elif query.in_stock is False:
        conditions.append(Product.stock == 0)

    column = _SORT_COLUMNS[query.sort]
    columns: list[InstrumentedAttribute[Any]] = (
        [column] if column is Product.id else [column, Product.id]
    )
    order = [c.desc() if query.descending else c.asc() for c in columns]  # ties broken by id
    offset = (query.page - 1) * query.size
    rows = [
        ProductRow(*row)
        for row in session.execute(
            select(*PRODUCT_COLUMNS)
            .where(*conditions)
            .order_by(*order)
            .offset(offset)
            .limit(query.size)
        )
    ]
    if not conditions:
        total = session.execute(
            select(ProductTotal.products).where(ProductTotal.id == 1)
        ).scalar_one()
    elif 0 < len(rows) < query.size:
        total = offset + len(rows)  # the last page: every match is behind or on it
    else:
        total = _bounded_total(session, conditions)
    # An estimate never says fewer than the pages already show.
    return rows, max(int(total), offset + len(rows)) if rows else int(total)


def _bounded_total(session: Session, conditions: list[ColumnElement[bool]]) -> int:
    """The number of products matching ``conditions``, exact up to ``EXACT_TOTAL_LIMIT``;
    past it the planner's estimate of the matches (at least the limit + 1)."""
    matches = select(Product.id).where(*conditions)
    counted = session.execute(
        select(func.count()).select_from(matches.limit(EXACT_TOTAL_LIMIT + 1).subquery())
    ).scalar_one()
    if counted <= EXACT_TOTAL_LIMIT:
        return int(counted)
    connection = session.connection()
    compiled = matches.compile(connection)
    (plan,) = connection.exec_driver_sql(
        f"EXPLAIN (FORMAT JSON) {compiled}", compiled.params
    ).scalar_one()
    return max(int(plan["Plan"]["Plan Rows"]), EXACT_TOTAL_LIMIT + 1)


_products = cast(Table, Product.__table__)
# The columns of a product as a batch reads and writes it (ProductRow's fields, in order).
PRODUCT_COLUMNS = tuple(
    _products.c[name]
    for name in ("id", "name", "price", "stock", "version", "created_at", "updated_at")
)


class ProductRow(NamedTuple):
    """A product row read or written by a batch (a plain value: no ORM object behind it)."""

    id: int
    name: str
    price: int
    stock: int
    version: int
    created_at: dt.datetime
    updated_at: dt.datetime

    def document(self, *, stock: int | None = None) -> dict[str, Any]:
        """The product as API.md shows it (``stock``: as of an earlier request of the batch)."""
        return {
            "id": self.id,
            "name": self.name,
            "price": self.price,
            "stock": self.stock if stock is None else stock,
            "createdAt": rfc3339(self.created_at),
            "updatedAt": rfc3339(self.updated_at),
        }


_LOCK_PRODUCTS = (
    select(*PRODUCT_COLUMNS)
    .where(_products.c.id == func.any(bindparam("ids", type_=ARRAY(BigInteger()))))
    .order_by(_products.c.id)
    .with_for_update()
)


def lock_products(session: Session, product_ids: list[int]) -> dict[int, ProductRow]:
    """Lock the products ``FOR UPDATE`` in ascending id order (deadlock-free, rule 2)."""
    if not product_ids:
        return {}
    rows = session.execute(_LOCK_PRODUCTS, {"ids": sorted(product_ids)})
    return {row.id: ProductRow(*row) for row in rows}


def return_stock(session: Session, product_id: int, quantity: int) -> None:
    """Put ``quantity`` back (an order moved to FAILED)."""
    session.execute(
        update(Product)
        .where(Product.id == product_id)
        .values(stock=Product.stock + quantity, version=Product.version + 1, updated_at=func.now())
    )


def get_products(session: Session, product_ids: list[int]) -> list[Product]:
    """The current rows of ``product_ids`` (to refresh the cache after a commit)."""
    if not product_ids:
        return []
    return list(
        session.execute(
            select(Product)
            .where(Product.id.in_(product_ids))
            .execution_options(populate_existing=True)
        ).scalars()
    )
