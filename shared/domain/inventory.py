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
from typing import Any

from sqlalchemy import BigInteger, column, func, insert, update, values
from sqlalchemy.orm import Session

from shared.domain.errors import DomainError, InsufficientStock, ProductNotFound, unwrap
from shared.domain.orders import DEFAULT_PAYMENT_TIMEOUT, OrderStatus
from shared.domain.products import lock_products
from shared.domain.sales import count_sales
from shared.formats import rfc3339
from shared.models import Order, OrderLine, Outbox, Product


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


def _decide_order(
    r: OrderRequest, products: dict[int, Product], stock: dict[int, int]
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
    and one outbox row each; their units go to the best-seller aggregate.
    Refusals: ``ProductNotFound``, ``InsufficientStock``.
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
            outcomes.append(
                _document(products[d.product_id], stock_after[index], written[d.product_id])
            )
        else:
            outcomes.append(placed.pop(0))
    return InventoryOutcomes(outcomes, touched, any(isinstance(d, OrderRequest) for d in decided))


def _write_stock(session: Session, changes: dict[int, tuple[int, int]]) -> dict[int, dt.datetime]:
    """One UPDATE for every changed product; returns each product's new ``updated_at``."""
    if not changes:
        return {}
    new = values(
        column("id", BigInteger), column("old", BigInteger), column("new", BigInteger), name="v"
    ).data([(pid, old, stock) for pid, (old, stock) in changes.items()])
    rows = session.execute(
        update(Product)
        .where(Product.id == new.c.id, Product.stock == new.c.old)
        .values(stock=new.c.new, version=Product.version + 1, updated_at=func.now())
        .returning(Product.id, Product.updated_at)
        .execution_options(synchronize_session=False)
    ).tuples()
    written = dict(rows.all())
    if len(written) != len(changes):
        # The rows were locked: a mismatch means something bypassed the lock. Roll back.
        raise RuntimeError(
            f"stock of products {set(changes) - set(written)} changed under their lock"
        )
    return written


def _units(orders: list[OrderRequest]) -> dict[int, int]:
    units: dict[int, int] = {}
    for o in orders:
        for line in o.lines:
            units[line.product_id] = units.get(line.product_id, 0) + line.quantity
    return units


def _insert_orders(
    session: Session,
    orders: list[OrderRequest],
    products: dict[int, Product],
    payment_timeout: dt.timedelta,
) -> list[PlacedOrder]:
    if not orders:
        return []
    rows = [
        {
            "user_id": o.user_id,
            "status": OrderStatus.READY.value,
            "total_price": sum(products[line.product_id].price * line.quantity for line in o.lines),
            "job_id": o.job_id,
        }
        for o in orders
    ]
    order_ids = list(
        session.execute(
            insert(Order)
            .values(expires_at=func.now() + payment_timeout)
            .returning(Order.id, sort_by_parameter_order=True),
            rows,
        ).scalars()
    )
    session.execute(
        insert(OrderLine),
        [
            {
                "order_id": order_id,
                "product_id": line.product_id,
                "quantity": line.quantity,
                "unit_price": products[line.product_id].price,
            }
            for order_id, o in zip(order_ids, orders, strict=True)
            for line in o.lines
        ],
    )
    session.execute(
        insert(Outbox),
        [{"order_id": order_id, "status": OrderStatus.READY.value} for order_id in order_ids],
    )
    return [
        PlacedOrder(order_id, OrderStatus.READY.value, row["user_id"], row["total_price"])  # type: ignore[arg-type]
        for order_id, row in zip(order_ids, rows, strict=True)
    ]


def _document(product: Product, stock: int, updated_at: dt.datetime) -> dict[str, Any]:
    return {
        "id": product.id,
        "name": product.name,
        "price": product.price,
        "stock": stock,
        "createdAt": rfc3339(product.created_at),
        "updatedAt": rfc3339(updated_at),
    }


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
