"""What one metric update costs, with and without prometheus_client's multiprocess mode.

    .venv/bin/python -m tests.metrics_cost [--gevent]

Runs the same micro-benchmark in two child processes, one with
``PROMETHEUS_MULTIPROC_DIR`` set (a scratch folder: each value an ``mmap``'d file
write under one process-wide lock) and one without (a float under a mutex), and
prints nanoseconds per operation (the best of several rounds, on one core):

* ``inc`` / ``observe`` of a child bound once (``metric.labels(...)`` kept);
* the same through ``metric.labels(...)`` on every call (the label look-up);
* ``job POST``: the metrics of one job POST, the request counter and latency
  histogram of ``web/health.py`` and the accepted counter, each through
  ``labels(...)``, then through ``shared.metrics.Bound`` (as the code does);
* ``drain batch of 50``: what ``shared.metrics`` records for one committed batch.

``--gevent`` monkey-patches first, as gunicorn's gevent worker does.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import tempfile
import timeit
from collections.abc import Callable

ROUNDS = 7
NUMBER = 20_000


def _per_op_ns(fn: Callable[[], object], number: int = NUMBER) -> float:
    best = min(timeit.repeat(fn, number=number, repeat=ROUNDS))
    return best / number * 1e9


def measure() -> dict[str, float]:
    from prometheus_client import Counter, Histogram

    from shared import metrics
    from shared.jobs import JobOutcome, JobRecord, JobStatus

    counter = Counter("bench_total", "c", ["kind"])
    histogram = Histogram("bench_seconds", "h", ["kind"])
    requests = Counter("bench_http_requests_total", "r", ["method", "endpoint", "status"])
    latency = Histogram("bench_http_request_seconds", "l", ["method", "endpoint"])
    child, hchild = counter.labels("POINTS_CHARGE"), histogram.labels("POINTS_CHARGE")

    def job_post_labels() -> None:
        requests.labels("POST", "/v1/points/charge", "202").inc()
        latency.labels("POST", "/v1/points/charge").observe(0.0012)
        counter.labels("POINTS_CHARGE").inc()

    bound_requests, bound_latency = metrics.Bound(requests), metrics.Bound(latency)

    def job_post() -> None:  # as web/health.py and web/publish.py do it
        bound_requests("POST", "/v1/points/charge", "202").inc()
        bound_latency("POST", "/v1/points/charge").observe(0.0012)
        metrics.count_accepted("POINTS_CHARGE")

    now = dt.datetime.now(dt.UTC)
    job = JobRecord(
        id=__import__("uuid").uuid4(),
        seq=1,
        kind="POINTS_CHARGE",
        partition="user.3",
        payload={},
        status=JobStatus.PENDING.value,
        result=None,
        error=None,
        attempts=0,
        idempotency_key=None,
        request_hash=None,
        created_at=now - dt.timedelta(milliseconds=30),
        finished_at=None,
    )
    batch = [JobOutcome.succeeded(job, {}, now) for _ in range(50)]

    def drain_batch() -> None:
        metrics.count_finished(batch)
        metrics.observe_batch("user.3", len(batch))

    return {
        "inc (bound child)": _per_op_ns(child.inc),
        "inc via labels()": _per_op_ns(lambda: counter.labels("POINTS_CHARGE").inc()),
        "observe (bound child)": _per_op_ns(lambda: hchild.observe(0.03)),
        "observe via labels()": _per_op_ns(lambda: histogram.labels("POINTS_CHARGE").observe(0.03)),
        "job POST, labels() each": _per_op_ns(job_post_labels),
        "job POST, Bound children": _per_op_ns(job_post),
        "drain batch of 50": _per_op_ns(drain_batch, number=NUMBER // 20),
    }


def child(gevent: bool) -> None:
    if gevent:
        from gevent import monkey

        monkey.patch_all()
    for name, ns in measure().items():
        print(f"{name}\t{ns:.0f}")


def main(argv: list[str]) -> None:
    gevent = "--gevent" in argv
    results: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="metrics-cost-") as folder:
        for mode in ("single process", "multiprocess"):
            env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
            if mode == "multiprocess":
                env["PROMETHEUS_MULTIPROC_DIR"] = folder
            command = [
                sys.executable,
                "-c",
                f"from tests.metrics_cost import child; child({gevent})",
            ]
            out = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
            results[mode] = dict(line.split("\t") for line in out.stdout.splitlines())
    print(f"ns per operation{' (gevent monkey-patched)' if gevent else ''}")
    print(f"{'':28}{'single process':>16}{'multiprocess':>14}")
    for name in results["single process"]:
        single, multi = results["single process"][name], results["multiprocess"][name]
        print(f"{name:28}{single:>16}{multi:>14}")


if __name__ == "__main__":
    main(sys.argv[1:])
