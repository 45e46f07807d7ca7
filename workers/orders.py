"""Order creation, on the partition of the order's smallest product id."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from shared.domain.orders import LineRequest, create_order
from shared.jobs import JobKind
from shared.models import Job
from workers.base import Effects, Runtime, handles


@handles(JobKind.ORDER_CREATE)
def apply_order_create(
    _rt: Runtime, session: Session, job: Job, effects: Effects
) -> dict[str, Any]:
    lines = [LineRequest(line["productId"], line["quantity"]) for line in job.payload["orderLines"]]
    order = create_order(session, job.payload["userId"], lines, job_id=job.id)
    effects.products.update(line.product_id for line in lines)
    effects.history = True
    return {"orderId": order.id, "status": order.status}
