"""The product partition: stock sets and orders, applied in arrival order.

Both kinds of job change stock, and a partition's jobs apply in the order they
were committed, so they are decided together against one view of the products
they touch: the rows are locked ``FOR UPDATE`` in ascending id order (deadlock
free), each request is decided in turn, and each product is then written once
(ARCHITECTURE rule 6).  A product updated once per batch rather than once per
order keeps a hot product fast (PostgreSQL slows on a row updated many times in
one transaction).
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Table,
    func,
    text,
    update,
)
from sqlalchemy.orm import Session

from shared.domain.batch_rows import batch_keys, unnest_rows
from shared.domain.errors import DomainError, InsufficientStock, ProductNotFound, unwrap
from shared.domain.orders import DEFAULT_PAYMENT_TIMEOUT, OrderStatus
from shared.domain.products import PRODUCT_COLUMNS, ProductRow, lock_products
from shared.domain.sales import count_sales
from shared.models import Order, Product


@dataclass(frozen=True)
class LineRequest:
    product_id: int
    quantity: int


@dataclass(frozen=True)
class OrderRequest:
    user_id: int
    lines: list[LineRequest]
    job_id: uuid.UUID | None = None


@dataclass(frozen=True)
class StockSet:
    product_id: int
    stock: int


@dataclass(frozen=True)
class PlacedOrder:
    id: int
    status: str
    user_id: int
    total_price: int


InventoryRequest = OrderRequest | StockSet
# A placed order, the product document after a stock set, or a refusal.
InventoryOutcome = PlacedOrder | dict[str, Any] | DomainError


@dataclass(frozen=True)
class InventoryOutcomes:
    outcomes: list[InventoryOutcome]
    changed_products: set[int]
    orders_placed: bool
    # Each changed product as the batch left it (for the read cache).
    written: dict[int, ProductRow]


def _decide_order(
    r: OrderRequest, products: dict[int, ProductRow], stock: dict[int, int]
) -> DomainError | None:
    """PRODUCT_NOT_FOUND beats INSUFFICIENT_STOCK (API.md), whatever the line order."""
    lines = sorted(r.lines, key=lambda line: line.product_id)
    missing = [line.product_id for line in lines if line.product_id not in products]
    if missing:
        return ProductNotFound(f"product {missing[0]} does not exist")
    for line in lines:
        if stock[line.product_id] < line.quantity:
            return InsufficientStock(
                f"product {line.product_id} has fewer than {line.quantity} in stock"
            )
    return None


def apply_inventory(
    session: Session,
    requests: list[InventoryRequest],
    *,
    payment_timeout: dt.timedelta = DEFAULT_PAYMENT_TIMEOUT,
) -> InventoryOutcomes:
    """Apply stock sets and orders in order; one outcome per request.

    An order takes every line or nothing.  Each changed product is written once
    with a compare-and-set UPDATE (``WHERE stock = <stock read under lock>``)
    that also bumps its version; ``ck_products_stock_non_negative`` refuses a
    negative stock on its own.  Orders are written READY with their lines (unit
    price = the price when ordered), ``expires_at`` = creation + ``payment_timeout``
    and one outbox row each; their units go to the best-seller aggregate.  Every
    statement takes the batch's rows as array parameters, so it compiles once
    whatever the batch size.  Refusals: ``ProductNotFound``, ``InsufficientStock``.
    """
    ids = sorted(
        {r.product_id for r in requests if isinstance(r, StockSet)}
        | {line.product_id for r in requests if isinstance(r, OrderRequest) for line in r.lines}
    )
    products = lock_products(session, ids)
    start = {pid: p.stock for pid, p in products.items()}
    stock = dict(start)
    decided: list[InventoryRequest | DomainError] = []
    stock_after: dict[int, int] = {}  # request index -> stock set (for its result)
    touched: set[int] = set()
    for index, r in enumerate(requests):
        if isinstance(r, StockSet):
            if r.product_id not in products:
                decided.append(ProductNotFound(f"product {r.product_id} does not exist"))
                continue
            stock[r.product_id] = r.stock
            stock_after[index] = r.stock
            touched.add(r.product_id)
            decided.append(r)
            continue
        refusal = _decide_order(r, products, stock)
        if refusal is not None:
            decided.append(refusal)
            continue
        for line in r.lines:
            stock[line.product_id] -= line.quantity
            touched.add(line.product_id)
        decided.append(r)

    written = _write_stock(session, {pid: (start[pid], stock[pid]) for pid in sorted(touched)})
    placed_requests = [d for d in decided if isinstance(d, OrderRequest)]
    placed = _insert_orders(session, placed_requests, products, payment_timeout)
    count_sales(session, _units(placed_requests))
    outcomes: list[InventoryOutcome] = []
    for index, d in enumerate(decided):
        if isinstance(d, DomainError):
            outcomes.append(d)
        elif isinstance(d, StockSet):
            # The document as of this request (a later request of the batch may change it).
            outcomes.append(written[d.product_id].document(stock=stock_after[index]))
        else:
            outcomes.append(placed.pop(0))
    return InventoryOutcomes(
        outcomes, touched, any(isinstance(d, OrderRequest) for d in decided), written
    )


_products = cast(Table, Product.__table__)


_CHANGES = unnest_rows("batch", id=BigInteger(), old=BigInteger(), new=BigInteger())
_WRITE_STOCK = (
    update(_products)
    .where(
        _products.c.id == batch_keys("batch", "id", BigInteger()),
        _products.c.id == _CHANGES.c.id,
        _products.c.stock == _CHANGES.c.old,
    )
    .values(stock=_CHANGES.c.new, version=_products.c.version + 1, updated_at=func.now())
    .returning(*PRODUCT_COLUMNS)
)


def _write_stock(session: Session, changes: dict[int, tuple[int, int]]) -> dict[int, ProductRow]:
    """One UPDATE for every changed product; returns each product as written."""
    if not changes:
        return {}
    rows = session.execute(
        _WRITE_STOCK,
        {
            "batch_id": list(changes),
            "batch_old": [old for old, _ in changes.values()],
            "batch_new": [new for _, new in changes.values()],
        },
    )
    written = {row.id: ProductRow(*row) for row in rows}
    if len(written) != len(changes):
        # The rows were locked: a mismatch means something bypassed the lock. Roll back.
        raise RuntimeError(
            f"stock of products {set(changes) - set(written)} changed under their lock"
        )
    return written


# A batch's orders, their lines and their outbox rows in one statement.  Each order
# takes its id from the identity's sequence in the ``placed`` CTE (evaluated once), so
# the answer maps each request's position ``n`` to its order id, whatever order
# RETURNING would have used.
_PLACE_ORDERS = text(
    """
    WITH placed AS MATERIALIZED (
        SELECT nextval(pg_get_serial_sequence('orders', 'id')) AS id, batch.*
        FROM unnest(CAST(:user_ids AS bigint[]), CAST(:totals AS bigint[]),
                    CAST(:job_ids AS uuid[])) WITH ORDINALITY
             AS batch(user_id, total_price, job_id, n)
    ), new_orders AS (
        INSERT INTO orders (id, user_id, status, total_price, job_id, expires_at)
        SELECT id, user_id, :status, total_price, job_id, now() + :payment_timeout
        FROM placed
    ), new_lines AS (
        INSERT INTO order_lines (order_id, product_id, quantity, unit_price)
        SELECT placed.id, line.product_id, line.quantity, line.unit_price
        FROM unnest(CAST(:line_orders AS bigint[]), CAST(:line_products AS bigint[]),
                    CAST(:line_quantities AS integer[]), CAST(:line_prices AS bigint[]))
             AS line(n, product_id, quantity, unit_price)
        JOIN placed USING (n)
    ), new_outbox AS (
        INSERT INTO outbox (order_id, status) SELECT id, :status FROM placed ORDER BY n
    )
    SELECT n, id FROM placed
    """
)


def _units(orders: list[OrderRequest]) -> dict[int, int]:
    units: dict[int, int] = {}
    for o in orders:
        for line in o.lines:
            units[line.product_id] = units.get(line.product_id, 0) + line.quantity
    return units


def _insert_orders(
    session: Session,
    orders: list[OrderRequest],
    products: dict[int, ProductRow],
    payment_timeout: dt.timedelta,
) -> list[PlacedOrder]:
    """The batch's orders READY, their lines (unit price = the price when ordered) and one
    outbox row each: one statement in all."""
    if not orders:
        return []
    totals = [
        sum(products[line.product_id].price * line.quantity for line in o.lines) for o in orders
    ]
    lines = [(n, line) for n, o in enumerate(orders, start=1) for line in o.lines]
    ids: dict[int, int] = dict(
        session.execute(
            _PLACE_ORDERS,
            {
                "status": OrderStatus.READY.value,
                "payment_timeout": payment_timeout,
                "user_ids": [o.user_id for o in orders],
                "totals": totals,
                "job_ids": [o.job_id for o in orders],
                "line_orders": [n for n, _ in lines],
                "line_products": [line.product_id for _, line in lines],
                "line_quantities": [line.quantity for _, line in lines],
                "line_prices": [products[line.product_id].price for _, line in lines],
            },
        ).all()
    )
    return [
        PlacedOrder(ids[n], OrderStatus.READY.value, o.user_id, total)
        for n, (o, total) in enumerate(zip(orders, totals, strict=True), start=1)
    ]


def create_order(
    session: Session,
    user_id: int,
    lines: list[LineRequest],
    *,
    job_id: uuid.UUID | None = None,
    payment_timeout: dt.timedelta = DEFAULT_PAYMENT_TIMEOUT,
) -> Order:
    """Place one order (a batch of one).  Raises ``ProductNotFound``, ``InsufficientStock``."""
    placed = unwrap(
        apply_inventory(
            session, [OrderRequest(user_id, lines, job_id)], payment_timeout=payment_timeout
        ).outcomes[0]
    )
    assert isinstance(placed, PlacedOrder)
    return session.get_one(Order, placed.id)


def set_stock(session: Session, product_id: int, stock: int) -> Product:
    """Set one product's stock (a batch of one).  Raises ``ProductNotFound``."""
    unwrap(apply_inventory(session, [StockSet(product_id, stock)]).outcomes[0])
    return session.get_one(Product, product_id, populate_existing=True)
