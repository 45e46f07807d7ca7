"""Starting Flower: ``python -m workers.flower [flower options]``.

* With ``APP_ENV=production`` it refuses to start unless ``FLOWER_BASIC_AUTH``
  (``user:password``) is set; Flower itself reads that variable and then asks
  for it on every page and API call.
* It waits (at most ``WAIT_FOR_WORKERS_SECONDS``) until the partition workers and
  the history listener answer a ping.  Flower inspects the workers once, when it
  starts, and its Broker tab lists the queues of the workers it inspected: started
  together with them it found none ("Inspect method active_queues failed") and
  showed a lone ``celery`` queue.  Should they not come, it starts anyway and the
  Broker tab lists the declared queues (``task_queues`` of ``make_celery``).
* It talks to the broker with kombu's own Redis transport: Flower picks its broker
  view by the scheme of the connection's URI, and the workers' transport class
  (``shared.broker``, a publishing optimisation) would name itself there instead
  of ``redis`` ("'redis' broker is not supported").
"""

from __future__ import annotations

import logging
import sys
import time

from celery import Celery

from shared.config import Settings

log = logging.getLogger(__name__)

WAIT_FOR_WORKERS_SECONDS = 60.0
NODE_PREFIXES = ("partitions", "history")


def wait_for_workers(app: Celery, deadline_seconds: float = WAIT_FOR_WORKERS_SECONDS) -> bool:
    """True once a node of each kind (``NODE_PREFIXES``) answers a ping, False past the deadline."""
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        try:
            replies = app.control.ping(timeout=1.0) or []
        except Exception as exc:  # the broker is not up yet
            log.debug("ping failed: %s", exc)
            time.sleep(1.0)  # the broker's own retry pace; bounded by the deadline
            continue
        nodes = {name for reply in replies for name in reply}
        if all(any(n.startswith(p) for n in nodes) for p in NODE_PREFIXES):
            return True
    return False


def main(argv: list[str]) -> None:
    settings = Settings.from_env()
    settings.check_flower()
    from workers.app import app

    app.conf.broker_transport = None  # the URL's own scheme (redis://), see above
    if not wait_for_workers(app):
        print("flower: workers not answering yet; starting anyway", file=sys.stderr, flush=True)
    app.start(["flower", *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
