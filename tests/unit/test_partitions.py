"""Routing is a pure, stable function (ARCHITECTURE rule 1); every worker consumes every queue."""

from __future__ import annotations

import pytest

from shared.config import Settings
from shared.partitions import (
    HISTORY_QUEUE,
    PartitionKind,
    all_partition_queues,
    partition,
    partition_index,
)
from workers.boot import worker_arguments

# Known outputs of the hash: a change of hash function re-routes live resources, so it
# must show up here.
KNOWN = [
    # key, count, index
    (1, 16, 6),
    (2, 16, 12),
    (3, 16, 1),
    (42, 16, 10),
    (1000, 16, 2),
    (2**63 - 1, 16, 9),
    (1, 64, 54),
    (42, 64, 58),
    (2**63 - 1, 64, 57),
    (1, 4, 2),
    (2, 4, 0),
]


@pytest.mark.parametrize(("key", "count", "index"), KNOWN)
def test_partition_index_is_stable(key: int, count: int, index: int) -> None:
    assert partition_index(key, count) == index


def test_partition_names_the_queue_of_the_kind() -> None:
    assert partition(PartitionKind.USER, 42, 16) == "user.10"
    assert partition(PartitionKind.PRODUCT, 42, 16) == "product.10"
    assert partition(PartitionKind.COUPON, 42, 16) == "coupon.10"
    assert partition(PartitionKind.USER, 123_456, 1) == "user.0"


def test_every_key_lands_in_range_and_every_partition_is_used() -> None:
    indexes = [partition_index(key, 16) for key in range(1, 2_001)]
    assert set(indexes) == set(range(16))


def test_all_queues_are_every_kind_times_every_index() -> None:
    queues = all_partition_queues(4)
    assert queues == [f"{kind}.{n}" for kind in ("user", "product", "coupon") for n in range(4)]
    assert HISTORY_QUEUE not in queues
    for kind in PartitionKind:
        for key in range(1, 200):
            assert partition(kind, key, 4) in queues


@pytest.mark.parametrize("partitions", [1, 3, 16])
def test_every_worker_consumes_every_partition_queue(partitions: int) -> None:
    settings = Settings(database_url="postgresql://localhost/x", partitions=partitions, worker_id=2)
    args = worker_arguments(settings)
    (queues,) = [a.removeprefix("--queues=").split(",") for a in args if a.startswith("--queues=")]
    assert sorted(queues) == sorted(all_partition_queues(partitions))
    assert HISTORY_QUEUE not in queues
    assert "--hostname=partitions2@%h" in args
