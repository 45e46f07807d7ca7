"""What the drain path records (shared/metrics.py), and where the metrics live.

In-process: the test process runs without PROMETHEUS_MULTIPROC_DIR, so the values
are read from the default registry; counters are cumulative, so each test compares
the values after with those before.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

import workers.points  # noqa: F401  (registers the user partition's handler)
from shared.config import ConfigError, Settings
from shared.jobs import JobKind, JobOutcome, JobStatus, record
from shared.metrics import count_finished
from shared.models import Job
from shared.supervisor import prepare_metrics_dir
from tests.stack import ROOT
from workers.base import Runtime, drain_partition
from workers.boot import metrics_port


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(autouse=True)
def _no_foreign_pending_jobs(session_factory: sessionmaker[Session]) -> None:
    """Jobs another suite left PENDING on this database are no concern here (rolled back)."""
    with session_factory() as session, session.begin():
        session.execute(
            update(Job).where(Job.status == JobStatus.PENDING.value).values(status="FAILED")
        )


def _submit(rt: Runtime, kind: JobKind, **payload: Any) -> str:
    with rt.session_factory() as session, session.begin():
        return record(
            session, kind=kind, payload=payload, partitions=rt.settings.partitions
        ).job.partition


def test_a_drain_counts_outcomes_by_kind_status_and_code_and_its_batch(runtime: Runtime) -> None:
    user = uuid.uuid4().int % 10**15 + 1
    names = {
        "ok": (
            "shop_jobs_finished_total",
            {"kind": "POINTS_CHARGE", "status": "SUCCEEDED", "code": ""},
        ),
        "refused": (
            "shop_jobs_finished_total",
            {"kind": "POINTS_USE", "status": "FAILED", "code": "INSUFFICIENT_POINTS"},
        ),
        "waited": ("shop_job_seconds_count", {"kind": "POINTS_CHARGE"}),
        "drains": ("shop_drains_total", {"kind": "user"}),
        "drain_seconds": ("shop_drain_seconds_count", {"kind": "user"}),
        "batches": ("shop_drain_batch_jobs_count", {"kind": "user"}),
        "batched_jobs": ("shop_drain_batch_jobs_sum", {"kind": "user"}),
    }
    before = {key: sample(name, **labels) for key, (name, labels) in names.items()}
    queue = ""
    for amount in (10, 20, 30):
        queue = _submit(runtime, JobKind.POINTS_CHARGE, userId=user, amount=amount)
    _submit(runtime, JobKind.POINTS_USE, userId=user, amount=1_000)  # INSUFFICIENT_POINTS

    assert drain_partition(runtime, queue) == 4

    delta = {key: sample(name, **labels) - before[key] for key, (name, labels) in names.items()}
    assert delta == {
        "ok": 3,
        "refused": 1,
        "waited": 3,
        "drains": 1,
        "drain_seconds": 1,
        "batches": 1,  # the empty look after the flag is cleared is not a batch
        "batched_jobs": 4,
    }


def test_the_time_to_finish_is_from_created_at_and_never_negative() -> None:
    from shared.jobs import JobRecord

    now = dt.datetime.now(dt.UTC)

    def job(created_at: dt.datetime) -> JobRecord:
        return JobRecord(
            id=uuid.uuid4(),
            seq=1,
            kind="STOCK_SET",
            partition="product.0",
            payload={},
            status="PENDING",
            result=None,
            error=None,
            attempts=0,
            idempotency_key=None,
            request_hash=None,
            created_at=created_at,
            finished_at=None,
        )

    buckets = {
        le: sample("shop_job_seconds_bucket", kind="STOCK_SET", le=le)
        for le in ("0.005", "5.0", "10.0")
    }
    total = sample("shop_job_seconds_sum", kind="STOCK_SET")
    count_finished(
        [
            JobOutcome.succeeded(job(now - dt.timedelta(seconds=7)), {}, now),
            JobOutcome.succeeded(job(now + dt.timedelta(seconds=1)), {}, now),  # clock skew
        ]
    )
    assert sample("shop_job_seconds_sum", kind="STOCK_SET") - total == pytest.approx(7)
    grown = {
        le: sample("shop_job_seconds_bucket", kind="STOCK_SET", le=le) - n
        for le, n in buckets.items()
    }
    assert grown == {"0.005": 1, "5.0": 1, "10.0": 2}  # buckets are cumulative


def test_the_supervisor_gives_every_child_a_metrics_folder_emptied_of_the_last_run(
    tmp_path: Path,
) -> None:
    env: dict[str, str] = {}
    folder = prepare_metrics_dir(env, tmp_path / "run")
    assert (
        env["PROMETHEUS_MULTIPROC_DIR"]
        == str(folder)
        == str((tmp_path / "run" / "metrics").absolute())
    )
    (folder / "counter_123.db").write_bytes(b"old")
    (folder / "notes.txt").write_text("not ours")
    prepare_metrics_dir(env, tmp_path / "run")
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]

    chosen = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "elsewhere")}
    assert prepare_metrics_dir(chosen, tmp_path / "run") == tmp_path / "elsewhere"
    assert (tmp_path / "elsewhere").is_dir()


def test_worker_metrics_ports_follow_the_worker_id() -> None:
    base = Settings(database_url="postgresql://x@localhost/x")
    assert metrics_port(base) is None
    assert metrics_port(Settings(database_url="x", metrics_port=9100, worker_id=2)) == 9102
    with pytest.raises(ConfigError, match="METRICS_PORT"):
        Settings(database_url="x", metrics_port=70_000)
    assert Settings.from_env({"DATABASE_URL": "x", "METRICS_PORT": "9100"}).metrics_port == 9100


_FORK_SCRIPT = """
import os
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from shared.metrics import JOBS_ACCEPTED

JOBS_ACCEPTED.labels(kind="ORDER").inc()
child = os.fork()
if child == 0:
    JOBS_ACCEPTED.labels(kind="ORDER").inc(2)
    os._exit(0)
os.waitpid(child, 0)
registry = CollectorRegistry()
MultiProcessCollector(registry)
print(os.getpid(), child, registry.get_sample_value("shop_jobs_accepted_total", {"kind": "ORDER"}))
"""


def test_each_forked_process_writes_its_own_metrics_file(tmp_path: Path) -> None:
    """The pid is read once per process (not at every increment), and again after a fork:
    a child's increments go to a file of its own, and the scrape adds both up."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", _FORK_SCRIPT],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    parent, child, total = int(out[0]), int(out[1]), float(out[2])
    assert total == 3.0
    assert {p.name for p in tmp_path.glob("counter_*.db")} == {
        f"counter_{parent}.db",
        f"counter_{child}.db",
    }
