"""Products and their stock: never negative, changed only by guarded SQL."""

from __future__ import annotations

import datetime as dt
import enum
import functools
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

from sqlalchemy import BigInteger, ColumnElement, Select, Table, bindparam, func, select, update
from sqlalchemy.orm import Session

from shared.domain.batch_rows import any_of
from shared.domain.errors import NotFound
from shared.formats import rfc3339
from shared.models import Product, ProductTotal


class ProductSort(enum.StrEnum):
    ID = "id"
    NAME = "name"
    PRICE = "price"
    CREATED_AT = "createdAt"


_SORT_COLUMN_NAMES: dict[ProductSort, str] = {
    ProductSort.ID: "id",
    ProductSort.NAME: "name",
    ProductSort.PRICE: "price",
    ProductSort.CREATED_AT: "created_at",
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
    Statements are built once per shape of query (``_listing``) and run on the
    session's connection, values as parameters.
    """
    listing = _listing(
        _Shape(
            name=bool(query.name),
            min_price=query.min_price is not None,
            max_price=query.max_price is not None,
            in_stock=query.in_stock,
            sort=query.sort,
            descending=query.descending,
        )
    )
    params: dict[str, object] = {
        "offset": (query.page - 1) * query.size,
        "limit": query.size,
        "min_price": query.min_price,
        "max_price": query.max_price,
    }
    if query.name:
        escaped = query.name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        params["name"] = f"%{escaped}%"
    connection = session.connection()
    rows = [ProductRow(*row) for row in connection.execute(listing.page, params)]
    offset = (query.page - 1) * query.size
    if listing.count is None:
        total = connection.execute(_PRODUCT_TOTAL).scalar_one()
    elif 0 < len(rows) < query.size:
        total = offset + len(rows)  # the last page: every match is behind or on it
    else:
        total = connection.execute(listing.count, params).scalar_one()
        if total > EXACT_TOTAL_LIMIT:
            compiled = listing.matches.compile(connection)
            (plan,) = connection.exec_driver_sql(
                f"EXPLAIN (FORMAT JSON) {compiled}", compiled.construct_params(params)
            ).scalar_one()
            total = max(int(plan["Plan"]["Plan Rows"]), EXACT_TOTAL_LIMIT + 1)
    # An estimate never says fewer than the pages already show.
    return rows, max(int(total), offset + len(rows)) if rows else int(total)


@dataclass(frozen=True)
class _Shape:
    """Which filters a listing has and how it is sorted (not the values)."""

    name: bool
    min_price: bool
    max_price: bool
    in_stock: bool | None
    sort: ProductSort
    descending: bool


@dataclass(frozen=True)
class _Listing:
    page: Select[Any]
    count: Select[Any] | None  # None: unfiltered (product_totals has the total)
    matches: Select[Any]  # what the planner estimates past EXACT_TOTAL_LIMIT


@functools.cache
def _listing(shape: _Shape) -> _Listing:
    """The statements of one shape of listing, values left as parameters (at most
    2 * 2 * 2 * 3 * 4 * 2 = 192 shapes)."""
    table = _products
    conditions: list[ColumnElement[bool]] = []
    if shape.name:
        conditions.append(table.c.name.ilike(bindparam("name"), escape="\\"))
    if shape.min_price:
        conditions.append(table.c.price >= bindparam("min_price"))
    if shape.max_price:
        conditions.append(table.c.price <= bindparam("max_price"))
    if shape.in_stock is True:
        conditions.append(table.c.stock > 0)
    elif shape.in_stock is False:
        conditions.append(table.c.stock == 0)
    column = table.c[_SORT_COLUMN_NAMES[shape.sort]]
    columns = [column] if column is table.c.id else [column, table.c.id]  # ties broken by id
    order = [c.desc() if shape.descending else c.asc() for c in columns]
    page = (
        select(*PRODUCT_COLUMNS)
        .where(*conditions)
        .order_by(*order)
        .offset(bindparam("offset"))
        .limit(bindparam("limit"))
    )
    matches = select(table.c.id).where(*conditions)
    count = (
        select(func.count()).select_from(matches.limit(EXACT_TOTAL_LIMIT + 1).subquery())
        if conditions
        else None
    )
    return _Listing(page, count, matches)


_products = cast(Table, Product.__table__)
_PRODUCT_TOTAL = select(cast(Table, ProductTotal.__table__).c.products).where(
    cast(Table, ProductTotal.__table__).c.id == 1
)
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
    .where(_products.c.id == any_of("ids", BigInteger()))
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
