"""Starting a partition worker: ``python -m workers.boot``.

Every partition worker consumes every partition queue, with a pool of
``WORKER_THREADS`` threads, so distinct partitions drain in parallel and a worker
that dies leaves its partitions to the others.  That is safe with any number of
workers: a message only wakes a partition, and its drainer holds the partition's
transaction-scoped advisory lock while it applies the jobs in ``seq`` order
(ARCHITECTURE, "Scaling"), so per-resource order comes from the database, not
from which process took which message (celery#4537).
"""

from __future__ import annotations

import sys

from shared.config import Settings
from shared.partitions import all_partition_queues


def worker_arguments(settings: Settings) -> list[str]:
    return [
        "worker",
        "--pool=threads",
        f"--concurrency={settings.worker_threads}",
        f"--queues={','.join(all_partition_queues(settings.partitions))}",
        f"--hostname=partitions{settings.worker_id}@%h",
    ]


def main(argv: list[str]) -> None:
    settings = Settings.from_env()
    from workers.app import app

    app.worker_main([*worker_arguments(settings), *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
