"""Routing is a pure function (ARCHITECTURE rule 1).

``partition(kind, key, count)`` maps a resource key to a queue name with a stable
hash, so every web process, worker and deployment agrees on it.
"""

from __future__ import annotations

import enum
import hashlib

HISTORY_QUEUE = "history"


class PartitionKind(enum.StrEnum):
    USER = "user"
    PRODUCT = "product"
    COUPON = "coupon"


def partition_index(key: int, count: int) -> int:
    """A stable hash of ``key`` into ``0..count-1`` (never Python's salted ``hash()``)."""
    digest = hashlib.blake2b(str(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def partition(kind: PartitionKind, key: int, count: int) -> str:
    """The queue of resource ``key`` of ``kind``: ``<kind>.<n>``."""
    return f"{kind.value}.{partition_index(key, count)}"


def kind_queues(kind: PartitionKind, count: int) -> list[str]:
    """The partition queues of one kind, in order: ``<kind>.0`` .. ``<kind>.<count-1>``."""
    return [f"{kind.value}.{n}" for n in range(count)]


def queue_kind(queue: str) -> PartitionKind:
    """The partition kind of a partition queue (``product.3`` -> ``product``)."""
    return PartitionKind(queue.partition(".")[0])


def all_partition_queues(count: int) -> list[str]:
    """Every partition queue of every kind, in a fixed order."""
    return [f"{kind.value}.{n}" for kind in PartitionKind for n in range(count)]
