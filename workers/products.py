"""Stock changes, on the product's partition."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from shared.domain.products import product_document, set_stock
from shared.jobs import JobKind
from shared.models import Job
from workers.base import Effects, Runtime, handles


@handles(JobKind.STOCK_SET)
def apply_stock_set(_rt: Runtime, session: Session, job: Job, effects: Effects) -> dict[str, Any]:
    product = set_stock(session, job.payload["productId"], job.payload["stock"])
    effects.products.add(product.id)
    return product_document(product)
