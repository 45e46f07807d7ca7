"""Starting a partition worker: ``python -m workers.boot``.

Every partition worker consumes every partition queue, with a pool of
``WORKER_THREADS`` threads, so distinct partitions drain in parallel and a worker
that dies leaves its partitions to the others.  That is safe with any number of
workers: a message only wakes a partition, and its drainer holds the partition's
transaction-scoped advisory lock while it applies the jobs in ``seq`` order
(ARCHITECTURE, "Scaling"), so per-resource order comes from the database, not
from which process took which message (celery#4537).

With ``METRICS_PORT`` set, worker ``i`` also serves its own metrics on
``METRICS_PORT + i`` (for hosts that share no ``PROMETHEUS_MULTIPROC_DIR`` with web).
"""

from __future__ import annotations

import sys

from prometheus_client import start_http_server

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


def metrics_port(settings: Settings) -> int | None:
    """Where this worker serves its own metrics (``METRICS_PORT`` + ``WORKER_ID``), if asked."""
    return settings.metrics_port + settings.worker_id if settings.metrics_port else None


def main(argv: list[str]) -> None:
    settings = Settings.from_env()
    port = metrics_port(settings)
    if port is not None:
        # The threads pool runs every task in this process: its registry has them all.
        # A taken port stops the worker here, loudly, and the supervisor retries.
        start_http_server(port, addr=settings.metrics_address)
    from workers.app import app

    app.worker_main([*worker_arguments(settings), *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
