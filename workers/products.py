"""The product partition: stock sets and orders, applied in arrival order."""

from __future__ import annotations

from sqlalchemy.orm import Session

from shared.domain.inventory import InventoryRequest, PlacedOrder, StockSet, apply_inventory
from shared.jobs import JobKind, JobRecord
from shared.partitions import PartitionKind
from workers.base import Effects, Outcome, Runtime, handles
from workers.orders import order_request, order_result


def _request(job: JobRecord) -> InventoryRequest:
    if JobKind(job.kind) is JobKind.STOCK_SET:
        return StockSet(job.payload["productId"], job.payload["stock"])
    return order_request(job)


@handles(PartitionKind.PRODUCT)
def apply_product_jobs(
    _rt: Runtime, session: Session, jobs: list[JobRecord], effects: Effects
) -> list[Outcome]:
    applied = apply_inventory(session, [_request(j) for j in jobs])
    effects.products |= applied.changed_products
    for pid, row in applied.written.items():
        effects.committed_products[pid] = (row.document(), row.version)
    effects.history |= applied.orders_placed
    return [order_result(o) if isinstance(o, PlacedOrder) else o for o in applied.outcomes]
