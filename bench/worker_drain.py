"""One partition worker's apply rate, without HTTP or Celery: ``python -m bench.worker_drain``.

The one measurement in bench/ that is not over HTTP: it answers "how many jobs per
second does one worker apply" (issues 4 and 5) by queueing N jobs of a kind on
private servers and timing ``workers.base.drain_partition`` over them in-process.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.config import Settings
from shared.domain.coupons import create_coupon
from shared.domain.products import create_product
from shared.embedded import EmbeddedPostgres, EmbeddedRedis, migrate
from shared.jobs import JobKind, record
from workers import make_celery
from workers.base import Runtime, drain_partition


def measure(
    rt: Runtime, kind: JobKind, payload: Callable[[int], dict[str, Any]], count: int
) -> float:
    with rt.session_factory() as session, session.begin():
        queue = ""
        for i in range(count):
            queue = record(
                session, kind=kind, payload=payload(i), partitions=rt.settings.partitions
            ).job.partition
    started = time.perf_counter()
    done = drain_partition(rt, queue)
    elapsed = time.perf_counter() - started
    assert done == count, f"{done} of {count} applied"
    return count / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker_drain")
    parser.add_argument("--jobs", type=int, default=2000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="drain-") as tmp:
        pg, rd = EmbeddedPostgres(Path(tmp) / "pg" / "data"), EmbeddedRedis(Path(tmp) / "redis")
        pg.start()
        rd.start()
        try:
            migrate(pg.url)
            settings = Settings(database_url=pg.url, redis_url=rd.url)
            make_celery(settings)  # registers the handlers
            rt = Runtime(settings, lambda _queue: None)
            with rt.session_factory() as session, session.begin():
                coupon = create_coupon(
                    session, name="bench", discount_amount=1, total_quantity=10**6
                ).id
                product = create_product(session, name="bench", price=10, stock=10**9).id
            kinds: list[tuple[JobKind, Callable[[int], dict[str, Any]]]] = [
                (JobKind.POINTS_CHARGE, lambda i: {"userId": 7, "amount": 1}),
                (JobKind.COUPON_ISSUE, lambda i: {"couponId": coupon, "userId": i + 1}),
                (
                    JobKind.ORDER_CREATE,
                    lambda i: {"userId": i, "orderLines": [{"productId": product, "quantity": 1}]},
                ),
            ]
            for kind, payload in kinds:
                rate = measure(rt, kind, payload, args.jobs)
                print(
                    f"{kind.value:15s} {args.jobs} queued jobs applied at {rate:,.0f}/s"
                    " by one worker"
                )
        finally:
            rd.stop()
            pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
