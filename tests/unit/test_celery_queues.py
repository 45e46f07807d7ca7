"""The Celery app declares every queue, and a message sent to one queue reaches only it.

Declared queues are what Flower's Broker tab lists before it has inspected a
worker; each must keep its own exchange and routing key (a bare ``Queue(name)``
would share the default ones, and one wake-up would land in every queue).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from celery import Celery
from redis import Redis

from shared.config import Settings
from shared.embedded import EmbeddedRedis
from shared.jobs import DRAIN_TASK
from shared.partitions import HISTORY_QUEUE, all_partition_queues
from workers import MAINTENANCE_QUEUE, SWEEP_TASK, make_celery

QUEUES = [*all_partition_queues(4), HISTORY_QUEUE, MAINTENANCE_QUEUE]


@pytest.fixture
def app_and_broker(tmp_path: Path) -> Iterator[tuple[Celery, Redis]]:
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    settings = Settings(
        database_url="postgresql://unused/unused", redis_url=server.url, partitions=4
    )
    broker = Redis.from_url(settings.broker_url)
    try:
        yield make_celery(settings), broker
    finally:
        broker.close()
        server.stop()


def backlogs(broker: Redis) -> dict[str, int]:
    return {name: cast(int, broker.llen(name)) for name in QUEUES}


def test_every_queue_is_declared_with_its_own_exchange_and_key(
    app_and_broker: tuple[Celery, Redis],
) -> None:
    app, _ = app_and_broker
    declared = app.amqp.queues
    assert sorted(declared) == sorted(QUEUES)
    for name in QUEUES:
        assert (declared[name].exchange.name, declared[name].routing_key) == (name, name)


def test_a_message_reaches_its_own_queue_only(app_and_broker: tuple[Celery, Redis]) -> None:
    app, broker = app_and_broker
    with app.connection_for_write() as conn:  # as the workers do when they start
        for queue in app.amqp.queues.values():
            queue(conn.default_channel).declare()
    for name in ("user.3", "product.0", HISTORY_QUEUE):
        app.send_task(DRAIN_TASK, args=[name], queue=name)
    app.send_task(SWEEP_TASK)  # no queue named: the default, which a worker consumes
    # Through the exchange and its bindings (what a bare Queue(name) gets wrong).
    app.send_task(SWEEP_TASK, exchange=MAINTENANCE_QUEUE, routing_key=MAINTENANCE_QUEUE)
    expected = dict.fromkeys(QUEUES, 0) | {
        "user.3": 1,
        "product.0": 1,
        HISTORY_QUEUE: 1,
        MAINTENANCE_QUEUE: 2,
    }
    assert backlogs(broker) == expected
    assert not broker.exists("celery")
