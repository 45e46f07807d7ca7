"""GET /v1/admin/partitions: what each partition queue has waiting, for operators."""

from __future__ import annotations

import re

import redis
from flask import Blueprint, Response, current_app

from shared.cache import make_redis
from shared.formats import rfc3339
from shared.jobs import last_drains, partition_backlogs
from shared.partitions import PartitionKind, all_partition_queues
from web.api import operation, settings
from web.errors import unavailable
from web.render import render
from web.schemas import ErrorBody, PartitionList, PartitionStatus
from web.session import db_session

bp = Blueprint("admin", __name__, url_prefix="/v1/admin")

_QUEUE = re.compile(r"^(user|product|coupon)\.(\d+)$")


def _broker() -> redis.Redis:
    """The broker's database, where drainers note their last drain beside the queues."""
    client: redis.Redis | None = current_app.extensions.get("broker_redis")
    if client is None:
        client = make_redis(settings().broker_url, timeout=1.0, settings=settings())
        current_app.extensions["broker_redis"] = client
    return client


def _extra_queues(backlogs: set[str], configured: list[str]) -> list[str]:
    """Partition queues holding jobs past the configured ones (PARTITIONS was lowered)."""
    kinds = [kind.value for kind in PartitionKind]
    found = [m for q in backlogs - set(configured) if (m := _QUEUE.match(q))]
    return [m.group(0) for m in sorted(found, key=lambda m: (kinds.index(m[1]), int(m[2])))]


@operation(
    bp,
    "/partitions",
    "GET",
    summary="Every partition queue: its PENDING jobs, the oldest one's age, its last drain (admin)",
    admin=True,
    responses={200: PartitionList, 503: ErrorBody},
)
def get_partitions() -> Response:
    backlogs = partition_backlogs(db_session())
    try:
        drains = last_drains(_broker())
    except redis.RedisError:
        raise unavailable("the broker (Redis) is unavailable") from None
    configured = all_partition_queues(settings().partitions)
    queues = configured + _extra_queues(set(backlogs), configured)
    items = []
    for queue in queues:
        backlog = backlogs.get(queue)
        drained = drains.get(queue)
        items.append(
            PartitionStatus(
                queue=queue,
                kind=queue.split(".", 1)[0],
                pending=backlog.pending if backlog else 0,
                oldest_pending_age_ms=backlog.oldest_age_ms if backlog else None,
                last_drain_at=rfc3339(drained) if drained else None,
            )
        )
    return render(PartitionList(items=items))
