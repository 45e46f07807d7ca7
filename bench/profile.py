"""Where the mixed load's CPU goes: CPU per job of each process group, and with
``--py-spy`` the functions of web and the worker that spend it.

    python -m bench.profile [--rate 900] [--seconds 30] [--py-spy] [--top 30]

It starts embedded PostgreSQL and Redis and the stack exactly as ``make bench`` does
(``bench.run.start_service``), runs ``bench.loadgen``'s mixed load at one rate, and prints
the CPU per finished job of each group (web, worker, postgres, redis, the generator) and
the completion latency per 5 s of the run.  With ``--py-spy`` (``pip install py-spy``)
each web and worker process and the generator are sampled while the load runs, only while
they hold the GIL (``--gil``: Python's CPU, not its waits); the tables give, per group, the
share of samples in each function (self) and under it (total).  A profile, not a
benchmark: the samplers take CPU from the load they watch, so compare two profiles, never
a profile with ``make bench``.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import checks
from bench.procstat import CpuMeter
from bench.run import loadgen, mixed_config, parse, servers, start_service


def _py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen(
        [
            *(exe, "record", "--gil", "--nonblocking", "--format", "raw", "--rate", "200"),
            *("--duration", str(int(seconds)), "--pid", str(pid), "--output", str(out)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _frame(frame: str) -> str:
    """``function (path/to/file.py:line)`` -> ``function (file.py)``: lines merged."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rsplit("/", 1)[-1]
    return f"{name} ({file})"


def top_functions(
    files: list[Path], top: int, *, by_self: bool = False
) -> list[tuple[str, float, float]]:
    """(function, self share, total share) of py-spy's collapsed stacks, most total (or
    most self) first."""
    own: collections.Counter[str] = collections.Counter()
    under: collections.Counter[str] = collections.Counter()
    samples = 0
    for file in files:
        if not file.exists():
            continue
        for line in file.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():  # py-spy's own remarks, if any
                continue
            count = int(count_text)
            frames = [_frame(f) for f in stack.split(";")[1:]]  # [0] is the thread
            if not frames:
                continue
            samples += count
            own[frames[-1]] += count
            for frame in set(frames):
                under[frame] += count
    if not samples:
        return []
    rank = own if by_self else under
    ranked = sorted(rank, key=lambda f: (-rank[f], f))[:top]
    return [(f, own[f] / samples, under[f] / samples) for f in ranked]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    p.add_argument("--rate", type=float, default=900, help="offered req/s (900)")
    p.add_argument("--seconds", type=float, default=30, help="length of the load (30)")
    p.add_argument("--py-spy", action="store_true", help="sample web and worker with py-spy")
    p.add_argument("--top", type=int, default=30, help="functions listed per group (30)")
    p.add_argument("--traces", type=Path, help="keep py-spy's collapsed stacks in this folder")
    p.add_argument("--stack-env", action="append", default=[], metavar="NAME=VALUE")
    own = p.parse_args(argv)
    if own.traces:
        own.traces.mkdir(parents=True, exist_ok=True)
    args = parse([f"--stack-env={e}" for e in own.stack_env])
    with servers(args) as run:
        pg, work = run.pg, run.work
        start_service(run)
        cfg: dict[str, Any] = mixed_config(run, own.rate, own.seconds, seed=int(own.rate))
        cfg["bucket_seconds"] = 5
        groups = run.service_groups()
        spies: list[subprocess.Popen[bytes]] = []
        traces: dict[str, list[Path]] = collections.defaultdict(list)

        def on_event(name: str) -> None:
            if name != "started" or not own.py_spy:
                return
            targets = {**groups, "generator": _generator()}
            for group in ("web", "worker", "generator"):
                for pid in _children(targets.get(group, [])):
                    out = (own.traces or work) / f"{group}-{pid}.txt"
                    traces[group].append(out)
                    spies.append(_py_spy(pid, own.seconds, out))

        jobs_before, seq_before = run.work_units(), checks.last_seq(pg.url)
        scans_before = table_scans(pg.url)
        meter = CpuMeter(run.service_groups)
        meter.start()
        result, generator_cpu = loadgen("mixed", cfg, work, on_event)
        checks.wait_drained(pg.url, args.drain_timeout)
        cpu = meter.stop()
        cpu["generator"] = generator_cpu
        jobs = run.work_units() - jobs_before
        for spy in spies:
            spy.wait()
        report(own, result, cpu, jobs, traces)
        print_batches(pg.url, seq_before)
        print_scans(scans_before, table_scans(pg.url), jobs)
    return 0


def _child_pids(pid: int) -> list[int]:
    listing = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in listing.read_text().split()] if listing.exists() else []


def _generator() -> list[int]:
    """The ``bench.loadgen`` process this one started (it has no children of its own)."""
    return [
        pid
        for pid in _child_pids(os.getpid())
        if b"bench.loadgen" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def _children(roots: list[int]) -> list[int]:
    """The roots' child processes (gunicorn's and Celery's forked workers), else the roots."""
    found: list[int] = []
    for root in roots:
        found += _child_pids(root) or [root]
    return found


def table_scans(url: str) -> dict[str, tuple[int, int, int, int]]:
    """Per table: sequential scans, rows they read, index scans, rows those fetched."""
    with checks.connect(url) as conn:
        rows = conn.execute(
            "SELECT relname, seq_scan, seq_tup_read, coalesce(idx_scan, 0),"
            " coalesce(idx_tup_fetch, 0) FROM pg_stat_user_tables"
        ).fetchall()
    return {name: (a, b, c, d) for name, a, b, c, d in rows}


def print_scans(
    before: dict[str, tuple[int, int, int, int]],
    after: dict[str, tuple[int, int, int, int]],
    jobs: int,
) -> None:
    """Rows read per job by sequential and by index scans, the tables read most first
    (the statistics collector's counts: flushed within a second or so of the load)."""
    delta = {
        name: [a - b for a, b in zip(now, before.get(name, (0, 0, 0, 0)), strict=True)]
        for name, now in after.items()
    }
    print("\nrows read per job (sequential scans: scans, rows; index scans: scans, rows)")
    for name, (seq, seq_rows, idx, idx_rows) in sorted(
        delta.items(), key=lambda kv: -(kv[1][1] + kv[1][3])
    )[:12]:
        per = max(jobs, 1)
        print(
            f"  {name:<28} seq {seq / per:7.3f} {seq_rows / per:9.1f}"
            f"   idx {idx / per:7.3f} {idx_rows / per:9.1f}"
        )


def print_batches(url: str, seq: int) -> None:
    """Jobs per committed batch of each drain kind (a batch's jobs share ``finished_at``),
    and per group commit of web (its rows share ``created_at``)."""
    with checks.connect(url) as conn:
        rows = conn.execute(
            "SELECT split_part(partition, '.', 1), count(*), count(DISTINCT finished_at)"
            " FROM jobs WHERE seq > %s AND finished_at IS NOT NULL GROUP BY 1 ORDER BY 1",
            (seq,),
        ).fetchall()
        (written, inserts) = conn.execute(
            "SELECT count(*), count(DISTINCT created_at) FROM jobs WHERE seq > %s", (seq,)
        ).fetchone() or (0, 0)
    print("\njobs per batch")
    for kind, jobs, batches in rows:
        print(f"  {kind:<10} {jobs:>7} jobs in {batches:>6} batches: {jobs / batches:6.1f}")
    # A group commit's rows share created_at (the INSERT's transaction time).
    per_insert = written / max(inserts, 1)
    print(f"  {'written':<10} {written:>7} jobs in {inserts:>6} INSERTs: {per_insert:6.1f}")


def report(
    own: argparse.Namespace,
    result: dict[str, Any],
    cpu: dict[str, float],
    jobs: int,
    traces: dict[str, list[Path]],
) -> None:
    print(f"\nmixed load, {own.rate:g} req/s offered for {own.seconds:g} s: {jobs} jobs")
    print(
        f"completed {result['completed_per_s']:.0f}/s, completion p99"
        f" {result['completion']['p99_ms']:.0f} ms, errors {result['error_count']}"
    )
    for bucket in result.get("completion_by_bucket", []):
        print(
            f"  from {bucket['from_s']:>4} s:"
            f" p50 {bucket['p50_ms']:>6.0f}  p99 {bucket['p99_ms']:>6.0f} ms"
        )
    print("\nCPU ms per job")
    for name, seconds in sorted(cpu.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<10} {seconds * 1e3 / max(jobs, 1):6.3f}")
    print(f"  {'total':<10} {sum(cpu.values()) * 1e3 / max(jobs, 1):6.3f}")
    for group, files in traces.items():
        for by_self in (False, True):
            order = "self" if by_self else "total"
            print(f"\n{group}: share of GIL-holding samples (self, total), by {order}")
            for function, self_share, total_share in top_functions(files, own.top, by_self=by_self):
                print(f"  {self_share:6.1%} {total_share:6.1%}  {function}")


if __name__ == "__main__":
    sys.exit(main())
