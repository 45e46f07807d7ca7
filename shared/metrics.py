"""Prometheus metrics of web and the workers: every metric object, and the calls that
record them (README, "Operating it" -> "Metrics", lists names and labels).

Recording costs a few counter increments or histogram observations in memory (or,
in multiprocess mode, in an ``mmap``'d file): never I/O, a Redis or a database round
trip.  What needs a query (the backlog of each partition) is read at scrape time
by ``BacklogCollector``, never on a request or in a drain.

Multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set by the run command's
supervisor): every process of the stack writes its values into files of that
folder, and one scrape of web's ``/metrics`` adds them up, gunicorn workers and
partition workers alike.  prometheus_client reads the variable itself when it is
imported, so it must be in the environment the process starts with.

Every metric has labels, so that no value (and no file) exists before its first
use: importing this module touches no file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from shared.jobs import Backlog, JobOutcome

log = logging.getLogger(__name__)


def _this_process_id() -> int:
    return _pid


def _forked() -> None:
    global _pid  # noqa: PLW0603 (the one value the fork hook updates)
    _pid = os.getpid()


# Multiprocess mode asks ``os.getpid()`` (a system call) at every increment, to notice a
# fork: several times per request (~3 % of a job POST in web).  The pid is read once per
# process instead, and again in the child of every fork.
_pid = os.getpid()
os.register_at_fork(after_in_child=_forked)
if values.ValueClass.__name__ == "MmapedValue":  # PROMETHEUS_MULTIPROC_DIR is set
    values.ValueClass = values.MultiProcessValue(process_identifier=_this_process_id)  # type: ignore[no-untyped-call]  # untyped upstream

# ---- jobs (web: accepted; workers: finished) ----------------------------------

JOBS_ACCEPTED = Counter(
    "shop_jobs_accepted",
    "Jobs committed and answered 202 (or 200 with Prefer: wait); Idempotency-Key replays excluded",
    ["kind"],
)
JOBS_FINISHED = Counter(
    "shop_jobs_finished",
    "Jobs whose outcome was committed, by status and error code (empty when SUCCEEDED)",
    ["kind", "status", "code"],
)
JOB_SECONDS = Histogram(
    "shop_job_seconds",
    "From a job's acceptance (createdAt, the database clock) to its outcome (finishedAt)",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)

# ---- drains (workers) ---------------------------------------------------------

DRAINS = Counter("shop_drains", "Drain tasks run (wake-ups of a partition handled)", ["kind"])
DRAIN_SECONDS = Histogram(
    "shop_drain_seconds",
    "How long one drain task ran (all its batches)",
    ["kind"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
BATCH_JOBS = Histogram(
    "shop_drain_batch_jobs",
    "Jobs per committed batch (one transaction of a partition's drain)",
    ["kind"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
SWEEPER_WAKEUPS = Counter(
    "shop_sweeper_wakeups",
    "Partitions woken again by the sweeper (a job PENDING longer than SWEEP_AFTER_SECONDS)",
    ["kind"],
)
RETENTION_PARTITIONS = Counter(
    "shop_retention_partitions",
    "Time partitions of jobs and outbox seen by the retention task, by outcome: created,"
    " dropped, held (past retention but holding a PENDING job or an undelivered outbox"
    " row: never dropped, so this one growing means a job is stuck)",
    ["table", "outcome"],
)

# ---- caches (web) -------------------------------------------------------------

CACHE_LOOKUPS = Counter(
    "shop_cache_lookups",
    "Reads of a Redis read cache (product, listing, top_sellers): hit, or miss (absent,"
    " being refreshed, Redis away)",
    ["cache", "result"],
)


class Bound:
    """``metric.labels(*values)``, looked up once per label values, then a dict get:
    ``labels()`` itself converts, locks and looks up on every call (~1 µs, measured
    by ``python -m tests.metrics_cost``).  A race only binds the same child twice."""

    def __init__(self, metric: Counter | Histogram) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


_accepted = Bound(JOBS_ACCEPTED)
_finished = Bound(JOBS_FINISHED)
_job_seconds = Bound(JOB_SECONDS)
_drains = Bound(DRAINS)
_drain_seconds = Bound(DRAIN_SECONDS)
_batch_jobs = Bound(BATCH_JOBS)
_cache_lookups = Bound(CACHE_LOOKUPS)


def kind_of_queue(queue: str) -> str:
    """``user.3`` -> ``user`` (a label per kind: a histogram per queue would be 48 of them)."""
    return queue.partition(".")[0]


def count_accepted(kind: str) -> None:
    """A job was committed (web, after the commit; an Idempotency-Key replay is not)."""
    _accepted(kind).inc()


def count_finished(outcomes: Iterable[JobOutcome]) -> None:
    """The outcomes of a committed batch (workers, after commit): one increment per
    (kind, status, code) and one observation per job."""
    tally: Tally[tuple[str, str, str]] = Tally()
    for outcome in outcomes:
        job = outcome.job
        code = outcome.error["code"] if outcome.error else ""
        tally[job.kind, outcome.status.value, code] += 1
        waited = (outcome.finished_at - job.created_at).total_seconds()
        _job_seconds(job.kind).observe(max(waited, 0.0))
    for labels, n in tally.items():
        _finished(*labels).inc(n)


def observe_batch(queue: str, jobs: int) -> None:
    """A batch of ``jobs`` jobs of ``queue`` was committed."""
    _batch_jobs(kind_of_queue(queue)).observe(jobs)


@contextlib.contextmanager
def draining(queue: str) -> Iterator[None]:
    """Count and time one drain task of ``queue``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        kind = kind_of_queue(queue)
        _drains(kind).inc()
        _drain_seconds(kind).observe(time.perf_counter() - started)


def count_swept(queues: Iterable[str]) -> None:
    for kind, n in Tally(kind_of_queue(q) for q in queues).items():
        SWEEPER_WAKEUPS.labels(kind).inc(n)


def count_retention(outcome: str, partitions: Iterable[str]) -> None:
    for table, n in Tally(p.split("_p", 1)[0] for p in partitions).items():
        RETENTION_PARTITIONS.labels(table, outcome).inc(n)


def count_cache_lookup(cache: str, *, hit: bool) -> None:
    """A read of ``cache`` (``product`` or ``listing``) found its entry, or not."""
    _cache_lookups(cache, "hit" if hit else "miss").inc()


# ---- exposition ---------------------------------------------------------------


def prepare_multiprocess_dir(folder: str) -> None:
    """Make sure the multiprocess folder exists (its files are created on first use)."""
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)


class BacklogCollector(Collector):
    """PENDING jobs and the age of the oldest, per partition queue, read at scrape time.

    ``read`` returns the backlogs of the partitions that have any (``shared.jobs.
    partition_backlogs``); every queue of ``queues`` is reported, 0 when it has none.
    A failed read is logged and leaves these gauges out of that scrape.
    """

    def __init__(self, queues: list[str], read: Callable[[], dict[str, Backlog]]) -> None:
        self._queues = queues
        self._read = read

    def collect(self) -> Iterator[Metric]:
        try:
            backlogs = self._read()
        except Exception as exc:
            log.warning("backlog metrics not read: %s", exc)
            return
        pending = GaugeMetricFamily(
            "shop_partition_pending_jobs",
            "PENDING jobs of a partition queue (read from the jobs table at scrape time)",
            labels=["queue", "kind"],
        )
        oldest = GaugeMetricFamily(
            "shop_partition_oldest_pending_age_seconds",
            "Age of a partition's oldest PENDING job (database clock; 0 when none)",
            labels=["queue", "kind"],
        )
        extra = sorted(set(backlogs) - set(self._queues))  # PARTITIONS was lowered
        for queue in [*self._queues, *extra]:
            backlog = backlogs.get(queue)
            labels = [queue, kind_of_queue(queue)]
            pending.add_metric(labels, backlog.pending if backlog else 0)
            oldest.add_metric(labels, backlog.oldest_age_ms / 1000 if backlog else 0.0)
        yield pending
        yield oldest


class _Forward(Collector):
    """This process's own metrics (the default registry), when not in multiprocess mode."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def exposition(multiprocess_dir: str, *extra: Collector) -> bytes:
    """The text of a scrape: every process's metrics (multiprocess mode) or this one's,
    then ``extra`` collectors, read now."""
    registry = CollectorRegistry(auto_describe=False)
    if multiprocess_dir:
        MultiProcessCollector(registry, path=multiprocess_dir)  # type: ignore[no-untyped-call]  # untyped upstream
    else:
        registry.register(_Forward())
    for collector in extra:
        registry.register(collector)
    return generate_latest(registry)
