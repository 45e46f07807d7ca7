"""Order jobs: what an ORDER_CREATE job asks and answers.

Orders are applied on the partition of their smallest product id, together with
that partition's stock sets (``workers.products``), because both change stock.
"""

from __future__ import annotations

from typing import Any

from shared.domain.inventory import LineRequest, OrderRequest, PlacedOrder
from shared.jobs import JobRecord


def order_request(job: JobRecord) -> OrderRequest:
    lines = [LineRequest(line["productId"], line["quantity"]) for line in job.payload["orderLines"]]
    return OrderRequest(job.payload["userId"], lines, job.id)


def order_result(placed: PlacedOrder) -> dict[str, Any]:
    return {"orderId": placed.id, "status": placed.status}
