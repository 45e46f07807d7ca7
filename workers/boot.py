"""Starting a partition consumer: which queues it owns, in one place.

``python -m workers.boot`` runs a solo-pool worker (one task at a time, so a
partition's jobs apply in order: celery#4537) on the partition queues that
worker ``WORKER_INDEX`` of ``WORKER_COUNT`` owns.
"""

from __future__ import annotations

import sys

from shared.config import Settings
from shared.partitions import all_partition_queues


def owned_queues(settings: Settings, index: int, count: int) -> list[str]:
    """Every ``count``-th partition queue starting at ``index``: disjoint, and together all."""
    return all_partition_queues(settings.partitions)[index::count]


def main(argv: list[str]) -> None:
    settings = Settings.from_env()
    queues = owned_queues(settings, settings.worker_index, settings.worker_count)
    from workers.app import app

    app.worker_main(
        [
            "worker",
            "--pool=solo",
            f"--queues={','.join(queues)}",
            f"--hostname=partitions{settings.worker_id}@%h",
            *argv,
        ]
    )


if __name__ == "__main__":
    main(sys.argv[1:])
