"""Load harness: the service beside its ceilings and the straight design, in one run.

``make bench`` (or ``python -m bench.run``) starts private PostgreSQL and Redis
servers and measures, scenario by scenario (``--only`` picks some):

* ``ceilings``: gunicorn + Flask on an empty route (wrk); a solo Celery worker
  draining no-op tasks through Redis;
* ``open``: wrk fire-and-forget POSTs (64 connections): orders over 200 products,
  orders on one hot product, point charges on one hot user;
* ``closed-spread`` / ``closed-hot``: closed-loop users (wrk, one connection per
  thread, ``bench/wrk/closed.lua``): each POSTs an order, waits for its job, then
  the next; 32 users over 200 products, 64 users on one hot product; client model
  ``prefer`` (``Prefer: wait`` on the POST, long polls if answered 202) and
  ``poll`` (POST, then long polls);
* ``mixed``: open-loop mixed load at fixed offered rates (``bench/loadgen.py``),
  every job awaited;
* ``longpoll``: thousands of clients long-polling jobs that stay PENDING (the
  partition worker stopped) while product reads and job POSTs are timed;
* ``soak`` (only when named): the mixed load for ``--soak-minutes`` with the
  retention shortened, storage, vacuum and memory sampled (``bench/soak.py``);
* ``reads``: product listings (the listing cache missed) and product details per
  second, from the stack's web (primary only) and from a second web whose lagging
  reads go to a streaming standby of the same primary, in the same run; then cached
  reads of one product (target: 3,000/s with p99 under 10 ms);
* ``auth``: web CPU per job POST with AUTH_MODE=none, jwt HS256 and jwt RS256
  (fresh and reused tokens), three web processes side by side (``bench/auth_cost.py``).

``open`` and the ``closed-*`` scenarios also run the straight design
(``bench/baseline_app.py``, sync workers) under the same client. After every
load the harness waits for the jobs to drain and checks the invariants with SQL
(``bench/checks.py``); a violation marks the row and the run exits non-zero.
CPU per process tree is sampled around every load (``bench/procstat.py``).

Writes ``bench/results/<UTC>.json``, ``.md`` (the tables) and ``.png`` (the plot).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import itertools
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import requests

from bench import auth_cost, checks, soak
from bench.procstat import CpuMeter, run_measured, wait_idle, wait_measured
from bench.report import fmt, markdown, plot, verdict
from shared.config import Settings
from shared.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedStandby, free_port, migrate
from tests.stack import BIN, ROOT, Stack

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
STOCK = 1_000_000_000
ADMIN_TOKEN = "bench-admin-token"
SCENARIOS = (
    "ceilings",
    "open",
    "closed-spread",
    "closed-hot",
    "web-scaling",
    "mixed",
    "longpoll",
    "reads",
    "auth",
    "soak",
)
# Long: run only when named.
NOT_BY_DEFAULT = ("soak",)
MODELS = ("prefer", "poll")
HOT_POINTS_USER = 900_000_001
MIXED_USERS = (800_000_001, 800_010_000)
LONGPOLL_USERS = (810_000_001, 819_999_999)
TARGETS = {"closed-spread": 1.0, "closed-hot": 2.0}
# Cached reads of one product (issue 12): at least this many per second, p99 below this.
CACHED_READS_TARGET = (3000.0, 10.0)

Row = dict[str, Any]


# ---- processes ----------------------------------------------------------------


def wrk(
    url: str,
    script: str,
    seconds: int,
    env: dict[str, str],
    log_dir: Path,
    *,
    threads: int = 2,
    connections: int = 64,
    timeout: int = 10,
) -> dict[str, Any]:
    """One wrk run; its JSON line, plus ``per_s`` and the CPU wrk itself used."""
    out, cpu, code = run_measured(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{seconds}s",
            "--timeout",
            f"{timeout}s",
            "-s",
            str(HERE / "wrk" / script),
            url,
        ],
        {**os.environ, "WRK_DIR": str(HERE / "wrk"), **env},
        stderr_path=log_dir / "wrk.log",
    )
    line = next((x for x in out.splitlines() if x.startswith("WRK_JSON ")), None)
    if code != 0 or line is None:
        raise RuntimeError(f"wrk {script} exited {code}: {out[-500:]} (see {log_dir}/wrk.log)")
    stats: dict[str, Any] = json.loads(line.removeprefix("WRK_JSON "))
    stats["seconds"] = stats["duration_us"] / 1e6
    stats["per_s"] = stats["requests"] / stats["seconds"]
    stats["generator_cpu_s"] = cpu
    return stats


def loadgen(
    mode: str, cfg: dict[str, Any], log_dir: Path, on_event: Callable[[str], None] | None = None
) -> tuple[dict[str, Any], float]:
    """``python -m bench.loadgen`` in its own process: (its result, its CPU seconds)."""
    with (log_dir / "loadgen.log").open("ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.loadgen", mode, json.dumps(cfg)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        result: dict[str, Any] | None = None
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("LOADGEN_EVENT ") and on_event is not None:
                on_event(line.split(maxsplit=1)[1].strip())
            elif line.startswith("LOADGEN_JSON "):
                result = json.loads(line.removeprefix("LOADGEN_JSON "))
        cpu, code = wait_measured(proc)
    if code != 0 or result is None:
        raise RuntimeError(f"loadgen {mode} exited {code}; see {log_dir}/loadgen.log")
    return result, cpu


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            requests.get(url, timeout=1)
        except requests.RequestException:
            time.sleep(0.2)
        else:
            return
    raise RuntimeError(f"{url} did not answer")


def gunicorn(
    app: str, port: int, env: dict[str, str], args: list[str], log: Path
) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [str(BIN / "gunicorn"), app, "--bind", f"127.0.0.1:{port}", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_http(f"http://127.0.0.1:{port}/")
    wait_idle([proc.pid])
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---- the run's shared state ---------------------------------------------------------


@dataclasses.dataclass
class Run:
    args: argparse.Namespace
    work: Path
    pg: EmbeddedPostgres
    rd: EmbeddedRedis
    stack: Stack | None = None
    hot: int = 0
    spread: list[int] = dataclasses.field(default_factory=list)
    baseline_hot: int = 0
    baseline_spread: list[int] = dataclasses.field(default_factory=list)
    coupons: list[int] = dataclasses.field(default_factory=list)

    @property
    def base(self) -> str:
        assert self.stack is not None
        return self.stack.base_url

    def service_groups(self) -> dict[str, list[int]]:
        """The stack's processes grouped by kind ("worker-1" counts as "worker")."""
        groups: dict[str, list[int]] = {"postgres": [self.pg_pid()], "redis": [self.rd_pid()]}
        assert self.stack is not None
        for name, proc in self.stack.procs.items():
            if proc.poll() is None:
                groups.setdefault(re.sub(r"[-_.]?\d+$", "", name), []).append(proc.pid)
        return groups

    def pg_pid(self) -> int:
        assert self.pg.proc is not None
        return self.pg.proc.pid

    def rd_pid(self) -> int:
        assert self.rd.proc is not None
        return self.rd.proc.pid

    def work_units(self) -> int:
        """Finished jobs plus orders taken without a job (the straight design)."""
        with checks.connect(self.pg.url) as conn:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM jobs WHERE status <> 'PENDING')"
                " + (SELECT count(*) FROM orders WHERE job_id IS NULL)"
            ).fetchone()
        return int(row[0]) if row else 0

    @contextmanager
    def measured(
        self, row: Row, groups: Callable[[], dict[str, list[int]]]
    ) -> Iterator[dict[str, float]]:
        """Around one load: CPU per group, then the drain and the invariants, into ``row``.

        The body puts the generator's CPU seconds into the yielded dict as ``"generator"``.
        """
        meter = CpuMeter(groups)
        units, seq = self.work_units(), checks.last_seq(self.pg.url)
        extra: dict[str, float] = {}
        meter.start()
        started = time.monotonic()
        yield extra
        drain_s, violations = checks.wait_drained(self.pg.url, self.args.drain_timeout)
        cpu = meter.stop()
        row["cpu_wall_s"] = round(time.monotonic() - started, 2)  # for "cores busy"
        cpu.update(extra)
        jobs = self.work_units() - units
        violations += checks.check_invariants(
            self.pg.url,
            stock=STOCK,
            service_ids=[self.hot, *self.spread] if self.hot else [],
            other_ids=[self.baseline_hot, *self.baseline_spread] if self.baseline_hot else [],
        )
        row["drain_s"] = round(drain_s, 2)
        row["jobs"] = jobs
        row["outcomes"] = checks.outcomes_since(self.pg.url, seq)
        row["cpu_s"] = {k: round(v, 3) for k, v in cpu.items()}
        row["cpu_ms_per_job"] = (
            {k: round(v * 1e3 / jobs, 3) for k, v in cpu.items()} if jobs else {}
        )
        row["violations"] = violations
        if violations:
            print(f"  INVARIANT VIOLATED in {row['scenario']} / {row['system']}:", file=sys.stderr)
            for v in violations:
                print(f"    {v}", file=sys.stderr)

    @contextmanager
    def baseline(self, workers: int) -> Iterator[tuple[str, Callable[[], dict[str, list[int]]]]]:
        """The straight design on gunicorn sync workers: (its URL, its CPU groups)."""
        port = free_port()
        proc = gunicorn(
            "bench.baseline_app:app",
            port,
            {"BASELINE_DATABASE_URL": self.pg.url},
            ["--workers", str(workers)],
            self.work / "baseline.log",
        )
        try:
            yield (
                f"http://127.0.0.1:{port}",
                lambda: {"web": [proc.pid], "postgres": [self.pg_pid()], "redis": [self.rd_pid()]},
            )
        finally:
            stop(proc)


def _admin_create(base: str, path: str, bodies: list[dict[str, Any]]) -> list[int]:
    """Resources created through the API (admin), one POST each; their ids."""
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    return [
        requests.post(f"{base}{path}", json=body, headers=headers, timeout=10).json()["id"]
        for body in bodies
    ]


def create_products(base: str, prefix: str, count: int) -> list[int]:
    """Products with a stock no run can exhaust."""
    return _admin_create(
        base,
        "/v1/products",
        [{"name": f"{prefix} {i}", "price": 100, "stock": STOCK} for i in range(count)],
    )


def create_coupons(base: str, count: int, quantity: int) -> list[int]:
    return _admin_create(
        base,
        "/v1/coupons",
        [
            {"name": f"bench {i}", "discountAmount": 10, "totalQuantity": quantity}
            for i in range(count)
        ],
    )


# ---- ceilings -----------------------------------------------------------------


def ceiling_http(run: Run) -> list[Row]:
    port = free_port()
    proc = gunicorn(
        "bench.ceiling_app:app",
        port,
        {},
        # The service's own worker class and count (gevent), so the two rows compare.
        ["--worker-class", "gevent", "--workers", "2", "--worker-connections", "10000"],
        run.work / "ceiling.log",
    )
    row: Row = {
        "section": "ceiling",
        "scenario": "ceiling: empty route",
        "system": "gunicorn (gevent x2) + Flask",
    }
    try:
        meter = CpuMeter(lambda: {"web": [proc.pid]})
        meter.start()
        stats = wrk(
            f"http://127.0.0.1:{port}",
            "get.lua",
            run.args.seconds,
            {"WRK_PATH": "/empty"},
            run.work,
        )
        cpu = meter.stop()
    finally:
        stop(proc)
    cpu["generator"] = stats["generator_cpu_s"]
    row.update(
        per_s=stats["per_s"],
        p50_ms=stats["p50_us"] / 1e3,
        p99_ms=stats["p99_us"] / 1e3,
        non2xx=stats["non2xx"],
        errors=stats["socket_errors"],
        jobs=stats["requests"],
        cpu_s=cpu,
        cpu_ms_per_job={k: v * 1e3 / stats["requests"] for k, v in cpu.items()},
        violations=[],
    )
    return [row]


def ceiling_celery(run: Run) -> list[Row]:
    redis_url = run.rd.url.replace("/0", "/5")
    tasks = run.args.noop_tasks
    env = {"NOOP_BROKER_URL": redis_url}
    os.environ.update(env)
    from bench.celery_noop import app as noop_app

    for i in range(tasks):
        noop_app.send_task("bench.noop", args=[i], queue="bench-noop")
    client = redis.Redis.from_url(redis_url)
    proc = subprocess.Popen(
        [
            str(BIN / "celery"),
            "-A",
            "bench.celery_noop",
            "worker",
            "--pool=solo",
            "--queues=bench-noop",
            "--loglevel=WARNING",
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
        ],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=(run.work / "noop.log").open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    meter = CpuMeter(lambda: {"worker": [proc.pid], "redis": [run.rd_pid()]})
    try:
        while client.llen("bench-noop") == tasks:
            time.sleep(0.01)
        meter.start()
        started = time.monotonic()
        start_len = client.llen("bench-noop")
        while client.llen("bench-noop") > 0:
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        cpu = meter.stop()
    finally:
        stop(proc)
    return [
        {
            "section": "ceiling",
            "scenario": "ceiling: no-op task",
            "system": "Celery solo+Redis",
            "per_s": start_len / elapsed,
            "jobs": start_len,
            "cpu_s": cpu,
            "cpu_ms_per_job": {k: v * 1e3 / start_len for k, v in cpu.items()},
            "note": f"{tasks} tasks",
            "violations": [],
        }
    ]


# ---- open loop, fire and forget (wrk) ------------------------------------------------


def applied_orders(url: str, product_ids: list[int]) -> int:
    """Stock taken so far (SQL, so the harness adds no requests to the web processes)."""
    with checks.connect(url) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(%s - stock), 0) FROM products WHERE id = ANY(%s)",
            (STOCK, product_ids),
        ).fetchone()
    return int(row[0]) if row else 0


def charged_points(url: str, user: int) -> int:
    with checks.connect(url) as conn:
        row = conn.execute("SELECT balance FROM points WHERE user_id = %s", (user,)).fetchone()
    return int(row[0]) if row else 0


def measure_applied(
    url: str, probe: Callable[[], int], run_load: Callable[[], dict[str, Any]], timeout: float
) -> tuple[dict[str, Any], float, float]:
    """Run the load; (its stats, applied/s during it, applied/s of the drain after it)."""
    before = probe()
    t0 = time.monotonic()
    stats = run_load()
    at_end = probe()
    elapsed = time.monotonic() - t0
    t_end = time.monotonic()
    while sum(checks.pending(url).values()) and time.monotonic() - t_end < timeout:
        time.sleep(0.05)
    drained = probe() - at_end
    drain_rate = drained / (time.monotonic() - t_end) if drained else float("nan")
    return stats, (at_end - before) / elapsed, drain_rate


def open_row(scenario: str, system: str, stats: dict[str, Any], **extra: Any) -> Row:
    return {
        "section": "open",
        "scenario": scenario,
        "system": system,
        "per_s": stats["per_s"],
        "p50_ms": stats["p50_us"] / 1e3,
        "p99_ms": stats["p99_us"] / 1e3,
        "non2xx": stats["non2xx"],
        "errors": stats["socket_errors"],
        "wrk": stats,
        **extra,
    }


def open_loop(run: Run) -> list[Row]:
    base, url, seconds, rows = run.base, run.pg.url, run.args.seconds, []
    loads: list[tuple[str, str, dict[str, str], Callable[[], int]]] = [
        (
            "orders, 200 products",
            "orders.lua",
            {"PRODUCT_LO": str(run.spread[0]), "PRODUCT_HI": str(run.spread[-1])},
            lambda: applied_orders(url, run.spread),
        ),
        (
            "orders, 1 hot product",
            "orders.lua",
            {"PRODUCT_LO": str(run.hot), "PRODUCT_HI": str(run.hot)},
            lambda: applied_orders(url, [run.hot]),
        ),
        (
            "point charges, 1 hot user",
            "points.lua",
            {"USER_LO": str(HOT_POINTS_USER), "USER_HI": str(HOT_POINTS_USER)},
            lambda: charged_points(url, HOT_POINTS_USER),
        ),
    ]
    for scenario, script, env, probe in loads:
        row: Row = {"scenario": scenario, "system": "this service"}
        with run.measured(row, run.service_groups) as extra:
            stats, applied, drain = measure_applied(
                url,
                probe,
                lambda script=script, env=env: wrk(base, script, seconds, env, run.work),
                run.args.drain_timeout,
            )
            extra["generator"] = stats["generator_cpu_s"]
        row.update(
            open_row(scenario, "this service", stats, applied_per_s=applied, drain_per_s=drain)
        )
        rows.append(row)
        print_progress(row)
    if run.args.no_baseline:
        return rows
    for workers in run.args.baseline_workers:
        with run.baseline(workers) as (url, groups):
            for scenario, lo, hi in (
                ("orders, 200 products", run.baseline_spread[0], run.baseline_spread[-1]),
                ("orders, 1 hot product", run.baseline_hot, run.baseline_hot),
            ):
                system = f"straight design, {workers} sync workers"
                row = {"scenario": scenario, "system": system}
                with run.measured(row, groups) as extra:
                    stats = wrk(
                        url,
                        "orders.lua",
                        seconds,
                        {"PRODUCT_LO": str(lo), "PRODUCT_HI": str(hi)},
                        run.work,
                    )
                    extra["generator"] = stats["generator_cpu_s"]
                row.update(
                    open_row(
                        scenario, system, stats, applied_per_s=stats["per_s"], drain_per_s=None
                    )
                )
                rows.append(row)
                print_progress(row)
    return rows


# ---- closed loop (wrk, one user per thread) -------------------------------------------


def closed_stats(stats: dict[str, Any]) -> dict[str, Any]:
    cycles = stats["cycles"]
    return {
        "cycles": cycles,
        "per_s": cycles / stats["seconds"],
        "cycle_p50_ms": stats["cycle_p50_us"] / 1e3,
        "cycle_p99_ms": stats["cycle_p99_us"] / 1e3,
        "request_p99_ms": stats["p99_us"] / 1e3,
        "requests_per_cycle": stats["requests"] / cycles if cycles else float("nan"),
        "one_request_share": stats["direct"] / cycles if cycles else float("nan"),
        "failed_jobs": stats["failed"],
        "non2xx": stats["non2xx"],
        "errors": stats["socket_errors"] + stats["bad"],
        "wrk": stats,
    }


def closed_load(run: Run, url: str, lo: int, hi: int, *, users: int, prefer: str) -> dict[str, Any]:
    """``users`` closed-loop users ordering single units of products ``lo``..``hi``."""
    args = run.args
    env = {
        "PRODUCT_LO": str(lo),
        "PRODUCT_HI": str(hi),
        "PREFER_WAIT": prefer,
        "POLL_WAIT": str(args.poll_wait),
    }
    return wrk(
        url,
        "closed.lua",
        args.seconds,
        env,
        run.work,
        threads=users,
        connections=users,
        timeout=max(args.prefer_wait, args.poll_wait) + 10,
    )


def closed_loop(run: Run, name: str) -> list[Row]:
    """The closed-loop load ``name`` on this service (each client model), then on the
    straight design (each worker count); ``--rounds`` times over, alternating, so that a
    machine's drift reaches both sides (``ratios`` takes each round's pairs, then their
    median)."""
    args = run.args
    if name == "closed-spread":
        scenario, users = f"closed loop, {args.spread_users} users, 200 products", args.spread_users
        svc_lo, svc_hi = run.spread[0], run.spread[-1]
        base_lo, base_hi = run.baseline_spread[0], run.baseline_spread[-1]
    else:
        scenario, users = f"closed loop, {args.hot_users} users, 1 hot product", args.hot_users
        svc_lo = svc_hi = run.hot
        base_lo = base_hi = run.baseline_hot

    rows = []
    for round_no in range(1, args.rounds + 1):
        label = scenario if args.rounds == 1 else f"{scenario}, round {round_no}"

        def new_row(system: str, label: str = label, round_no: int = round_no) -> Row:
            return {
                "section": "closed",
                "key": name,
                "scenario": label,
                "base_scenario": scenario,
                "round": round_no,
                "system": system,
            }

        for model in args.models:
            prefer = str(args.prefer_wait) if model == "prefer" else ""
            rows.append(
                measure_closed(
                    run,
                    new_row("this service"),
                    run.service_groups,
                    (run.base, svc_lo, svc_hi),
                    users=users,
                    prefer=prefer,
                    client=model,
                )
            )
        if args.no_baseline:
            continue
        for workers in args.baseline_workers:
            with run.baseline(workers) as (url, groups):
                rows.append(
                    measure_closed(
                        run,
                        new_row(f"straight design, {workers} sync workers"),
                        groups,
                        (url, base_lo, base_hi),
                        users=users,
                        prefer=str(args.prefer_wait),
                        client="one POST (200)",
                    )
                )
    return rows


def measure_closed(
    run: Run,
    row: Row,
    groups: Callable[[], dict[str, list[int]]],
    target: tuple[str, int, int],
    *,
    users: int,
    prefer: str,
    client: str,
) -> Row:
    """``row`` filled with a closed-loop load of ``users`` against ``target`` (URL, lowest
    and highest product id) and the CPU of ``groups``; printed as it is done."""
    url, lo, hi = target
    with run.measured(row, groups) as extra:
        stats = closed_load(run, url, lo, hi, users=users, prefer=prefer)
        extra["generator"] = stats["generator_cpu_s"]
    row.update(client=client, users=users, **closed_stats(stats))
    print_progress(row)
    return row


def restart_web(run: Run, processes: int) -> None:
    """The stack's gunicorn again, with ``processes`` workers (``WEB_CONCURRENCY``)."""
    assert run.stack is not None
    run.stack.kill("web", signal.SIGTERM)
    run.stack.extra_env["WEB_CONCURRENCY"] = str(processes)
    run.stack.start("web")
    wait_idle([p.pid for p in run.stack.procs.values()])


def web_scaling(run: Run) -> list[Row]:
    """Each of ``--web-processes`` gunicorn worker counts under two loads: the
    closed-spread load (``Prefer: wait``), which saturates the machine, and the mixed
    load at the fixed ``--web-scaling-rate``, which does not.  A job's CPU must not grow
    with the web processes (each parses only the outcomes of its own waiters); the fixed
    rate shows that cost alone, the closed loop adds what more processes than cores cost
    when every core is busy (smaller group commits, more switches)."""
    args = run.args
    users = args.spread_users
    rows = []
    try:
        for processes in args.web_processes:
            restart_web(run, processes)
            rows.append(_scaling_closed(run, processes, users))
            rows.append(_scaling_open(run, processes))
    finally:
        restart_web(run, 2)
    return rows


def _scaling_closed(run: Run, processes: int, users: int) -> Row:
    row: Row = {
        "section": "closed",
        "key": "web-scaling",
        "scaling_load": f"closed loop, {users} users (saturating)",
        "scenario": f"closed loop, {users} users, 200 products, {processes} web processes",
        "system": "this service",
        "web_processes": processes,
    }
    return measure_closed(
        run,
        row,
        run.service_groups,
        (run.base, run.spread[0], run.spread[-1]),
        users=users,
        prefer=str(run.args.prefer_wait),
        client="prefer",
    )


def _scaling_open(run: Run, processes: int) -> Row:
    rate = run.args.web_scaling_rate
    row: Row = {
        "section": "mixed",
        "key": "web-scaling",
        "scaling_load": f"mixed open loop, {rate:g} req/s",
        "scenario": f"mixed open loop, {rate:g} req/s offered, {processes} web processes",
        "system": "this service",
        "web_processes": processes,
    }
    mixed_load(run, row, rate, run.args.web_scaling_seconds, seed=processes)
    print_progress(row)
    return row


def scaling_rows(rows: list[Row]) -> list[Row]:
    """Per-job CPU of each web-scaling row against the fewest web processes measured
    under the same load."""
    out = []
    measured = [r for r in rows if r.get("key") == "web-scaling" and r.get("cpu_ms_per_job")]
    for load in dict.fromkeys(r["scaling_load"] for r in measured):
        same_load = [r for r in measured if r["scaling_load"] == load]
        first = min(same_load, key=lambda r: r["web_processes"])
        base = _total_ms(first)
        out += [
            {
                "scaling_load": load,
                "web_processes": r["web_processes"],
                "per_s": r["per_s"],
                "web_ms": r["cpu_ms_per_job"].get("web"),
                "total_ms": _total_ms(r),
                "against": f"{first['web_processes']} web processes",
                "cpu_ratio": _total_ms(r) / base if base else float("nan"),
                # Noise of a shared 2-core machine aside: 5 % more is "grown".
                "met": _total_ms(r) <= base * 1.05,
            }
            for r in same_load
        ]
    return out


def _total_ms(row: Row) -> float:
    return float(sum(row["cpu_ms_per_job"].values()))


def ratios(rows: list[Row]) -> list[Row]:
    """Every (this service / straight design) pair of each closed-loop scenario and round;
    with several rounds, then the median of each round's ratio to its best straight design."""
    out = []
    for key in ("closed-spread", "closed-hot"):
        of_key = [r for r in rows if r.get("key") == key]
        rounds = sorted({r.get("round", 1) for r in of_key})
        for round_no in rounds:
            out += _round_ratios(key, [r for r in of_key if r.get("round", 1) == round_no])
        if len(rounds) > 1:
            out += _median_ratios(key, [r for r in out if r["key"] == key and "target" in r])
    return out


def _target(key: str) -> str:
    return f">= {TARGETS[key]:.1f}x" + (", lower p99" if key == "closed-hot" else "")


def _met(key: str, orders_ratio: float, p99_ratio: float) -> bool:
    return orders_ratio >= TARGETS[key] and (key != "closed-hot" or p99_ratio < 1.0)


def _round_ratios(key: str, rows: list[Row]) -> list[Row]:
    """One round's pairs: each client model against each straight design, then against
    the best of them (the row the target is judged on)."""
    mine = [r for r in rows if r["system"] == "this service"]
    theirs = [r for r in rows if r["system"] != "this service"]
    if not mine or not theirs:
        return []
    best = max(theirs, key=lambda r: r["per_s"])
    out = []
    for m in mine:
        out += [_pair(key, m, t) for t in theirs]
        judged = _pair(key, m, best)
        judged["against"] = "the best of them: " + best["system"].removeprefix("straight design, ")
        judged.update(
            target=_target(key), met=_met(key, judged["orders_ratio"], judged["p99_ratio"])
        )
        out.append(judged)
    return out


def _pair(key: str, mine: Row, theirs: Row) -> Row:
    return {
        "key": key,
        "scenario": mine["scenario"],
        "base_scenario": mine.get("base_scenario", mine["scenario"]),
        "client": mine["client"],
        "against": theirs["system"],
        "orders_ratio": mine["per_s"] / theirs["per_s"] if theirs["per_s"] else float("nan"),
        "p99_ratio": mine["cycle_p99_ms"] / theirs["cycle_p99_ms"]
        if theirs["cycle_p99_ms"]
        else float("nan"),
    }


def _median_ratios(key: str, best_rows: list[Row]) -> list[Row]:
    out = []
    for client in dict.fromkeys(r["client"] for r in best_rows):
        of_client = [r for r in best_rows if r["client"] == client]
        orders = statistics.median(r["orders_ratio"] for r in of_client)
        p99 = statistics.median(r["p99_ratio"] for r in of_client)
        out.append(
            {
                "key": key,
                "scenario": of_client[0]["base_scenario"],
                "client": client,
                "against": f"each round's best, median of {len(of_client)} rounds",
                "orders_ratio": orders,
                "p99_ratio": p99,
                "target": _target(key),
                "met": _met(key, orders, p99),
            }
        )
    return out


# ---- open loop mixed, every job awaited --------------------------------------------------


def mixed_config(run: Run, rate: float, seconds: float, *, seed: int) -> dict[str, Any]:
    """``bench.loadgen``'s mixed load at ``rate`` requests/s for ``seconds``."""
    args = run.args
    return {
        "base": run.base,
        "rate": rate,
        "seconds": seconds,
        "products": run.spread,
        "coupons": run.coupons,
        "charge_users": MIXED_USERS,
        "prefer_wait": args.prefer_wait,
        "poll_wait": args.poll_wait,
        "give_up_after": args.give_up_after,
        "max_in_flight": args.max_in_flight,
        "seed": seed,
    }


def mixed(run: Run) -> list[Row]:
    args, rows = run.args, []
    for rate in args.mixed_rates:
        row: Row = {
            "section": "mixed",
            "scenario": f"mixed open loop, {rate:g} req/s offered",
            "system": "this service",
            "rate": rate,
        }
        rows.append(mixed_load(run, row, rate, args.mixed_seconds, seed=int(rate)))
        print_progress(row)
    return rows


def mixed_load(run: Run, row: Row, rate: float, seconds: float, *, seed: int) -> Row:
    """``row`` filled with the mixed load at ``rate`` for ``seconds``: its completions,
    its backlog (sampled) and the CPU of the service's processes."""
    cfg = mixed_config(run, rate, seconds, seed=seed)
    sampler = checks.BacklogSampler(run.pg.url)
    at_end: dict[str, int] = {}

    def on_event(name: str) -> None:
        if name == "scheduled":
            at_end.update(checks.pending(run.pg.url))

    with run.measured(row, run.service_groups) as extra:
        sampler.start()
        try:
            result, cpu = loadgen("mixed", cfg, run.work, on_event)
        finally:
            backlog = sampler.stop()
        extra["generator"] = cpu
    backlog["at_end_of_load"] = sum(at_end.values())
    backlog["worst_partition_at_end"] = max(at_end.values(), default=0)
    row.update(
        per_s=result["completed_per_s"],
        offered_per_s=result["offered_per_s"],
        jobs_offered_per_s=result["jobs_offered"] / seconds,
        accepted_per_s=result["accepted_per_s"],
        completed_per_s=result["completed_per_s"],
        completion_p50_ms=result["completion"]["p50_ms"],
        completion_p99_ms=result["completion"]["p99_ms"],
        read_p99_ms=result["read"]["p99_ms"],
        errors=result["error_count"],
        generator_lag_ms=result["generator_worst_lag_ms"],
        backlog=backlog,
        loadgen=result,
    )
    return row


# ---- soak: the mixed load for a long time, retention shortened --------------------------


def soak_run(run: Run) -> list[Row]:
    """``bench/soak.py``: the mixed load for ``--soak-minutes``, storage and memory sampled."""
    args = run.args
    seconds = args.soak_minutes * 60
    row: Row = {
        "section": "soak",
        "scenario": f"soak: mixed {args.soak_rate:g} req/s offered for {args.soak_minutes:g} min",
        "system": "this service",
        "retention_s": args.soak_retention_minutes * 60,
        "partition_s": args.soak_partition_seconds,
    }
    cfg = mixed_config(run, args.soak_rate, seconds, seed=17) | {"bucket_seconds": 60}
    sampler = soak.SoakSampler(run.pg.url, run.rd.url, run.pg_pid(), args.soak_sample_seconds)
    sampler.start()
    try:
        result, cpu = loadgen("mixed", cfg, run.work)
        drain_s, violations = checks.wait_drained(run.pg.url, args.drain_timeout)
    finally:
        samples = sampler.stop()
    row["sample_failures"] = sampler.failed
    violations += checks.check_invariants(
        run.pg.url,
        stock=STOCK,
        service_ids=[run.hot, *run.spread],
        other_ids=[],
        with_jobs=False,  # finished jobs past the shortened retention are gone, as they should
    )
    verdict = soak.evaluate(
        samples,
        result["completion_by_bucket"],
        retention_s=row["retention_s"],
        width_s=row["partition_s"],
        minutes=args.soak_minutes,
    )
    if verdict["storage_flat"] is False:
        violations.append("storage kept growing after the retention window was full")
    if verdict["p99_flat"] is False:
        violations.append("completion p99 of the last minutes more than 20 % above the first")
    row.update(
        rate=args.soak_rate,
        offered_per_s=result["offered_per_s"],
        accepted_per_s=result["accepted_per_s"],
        completed_per_s=result["completed_per_s"],
        jobs_offered_per_s=result["jobs_offered"] / seconds,
        completion_p50_ms=result["completion"]["p50_ms"],
        completion_p99_ms=result["completion"]["p99_ms"],
        read_p99_ms=result["read"]["p99_ms"],
        errors=result["error_count"],
        generator_lag_ms=result["generator_worst_lag_ms"],
        drain_s=round(drain_s, 2),
        generator_cpu_s=cpu,
        by_minute=result["completion_by_bucket"],
        samples=samples,
        verdict=verdict,
        violations=violations,
        loadgen=result,
    )
    print_progress(row)
    return [row]


# ---- long polls held while reads and POSTs are timed -------------------------------------


def longpoll(run: Run) -> list[Row]:
    args = run.args
    assert run.stack is not None
    stack = run.stack
    row: Row = {
        "section": "longpoll",
        "scenario": f"{args.longpoll_clients} long polls held (wait={args.longpoll_wait})",
        "system": "this service",
    }
    cfg = {
        "base": run.base,
        "clients": args.longpoll_clients,
        "wait": args.longpoll_wait,
        "products": run.spread,
        "charge_users": LONGPOLL_USERS,
        "probe_rate": args.probe_rate,
        "probe_seconds": args.probe_seconds,
    }
    workers = [name for name in stack.procs if name.startswith("worker")]

    def restart_workers(_event: str = "") -> None:
        for name in workers:
            if name not in stack.procs:
                stack.start(name)

    with run.measured(row, run.service_groups) as extra:
        for name in workers:
            stack.kill(name, signal.SIGTERM)
        try:
            result, cpu = loadgen("longpoll", cfg, run.work, restart_workers)
        finally:
            restart_workers()
        extra["generator"] = cpu
    delta = args.longpoll_target_ms
    read_d, post_d = result["read_p99_delta_ms"], result["post_p99_delta_ms"]
    row.update(
        clients=args.longpoll_clients,
        held=result["held_during_probe"],
        read_p99_unloaded_ms=result["unloaded"]["read"]["p99_ms"],
        read_p99_loaded_ms=result["loaded"]["read"]["p99_ms"],
        read_p99_delta_ms=read_d,
        post_p99_unloaded_ms=result["unloaded"]["post"]["p99_ms"],
        post_p99_loaded_ms=result["loaded"]["post"]["p99_ms"],
        post_p99_delta_ms=post_d,
        met=read_d is not None and post_d is not None and read_d <= delta and post_d <= delta,
        woken_p99_ms=result["woken_after_restart"]["p99_ms"],
        errors=result["error_count"],
        loadgen=result,
    )
    print_progress(row)
    return [row]


# ---- reads: listings and details, with and without a replica --------------------------


def _web_reads_on(url: str) -> bool:
    """Whether the web's pools (application_name shop-test) hold connections on ``url``."""
    with checks.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'shop-test'"
        ).fetchone()
    return bool(row and row[0])


def read_row(scenario: str, system: str, stats: dict[str, Any], cpu: dict[str, float]) -> Row:
    requests_done = stats["requests"]
    return {
        "section": "reads",
        "scenario": scenario,
        "system": system,
        "per_s": stats["per_s"],
        "p50_ms": stats["p50_us"] / 1e3,
        "p99_ms": stats["p99_us"] / 1e3,
        "non2xx": stats["non2xx"],
        "errors": stats["socket_errors"],
        "jobs": requests_done,
        "cpu_s": {k: round(v, 3) for k, v in cpu.items()},
        "cpu_ms_per_job": (
            {k: round(v * 1e3 / requests_done, 3) for k, v in cpu.items()} if requests_done else {}
        ),
        "violations": [],
        "wrk": stats,
    }


# A seed per run of reads.lua (bench/wrk/reads.lua).
_SEEDS = itertools.count(1000 + os.getpid() % 1000, 1000)


def _seeded(env: dict[str, str]) -> dict[str, str]:
    """``env`` with a seed no other run of reads.lua used: its own listing queries."""
    return {**env, "READ_SEED": str(next(_SEEDS))}


def reads(run: Run) -> list[Row]:
    """Listings and details per second through the stack's web (every read on the primary)
    and through a second web given a streaming standby of that primary, one after the
    other on the same data; then cached reads of one product."""
    args, rows = run.args, []
    standby = EmbeddedStandby(run.pg, run.work / "pg" / "replica0", log_name="replica0.log")
    replica_web = Stack(
        run.pg.url,
        run.rd.url,
        run.work / "logs-replica",
        admin_token=ADMIN_TOKEN,
        extra_env={**stack_env(args), "DATABASE_REPLICA_URLS": standby.url},
    )
    try:
        standby.start()
        replica_web.start("web")
        assert standby.proc is not None
        wait_idle([replica_web.procs["web"].pid, standby.proc.pid])
        deadline = time.monotonic() + 60
        while not _web_reads_on(standby.url):  # the checker has seen it caught up
            if time.monotonic() > deadline:
                raise RuntimeError("the replica web never read from the standby")
            fresh = int(time.monotonic() * 1000)  # a listing not cached yet
            requests.get(f"{replica_web.base_url}/v1/products?maxPrice={fresh}", timeout=10)
            time.sleep(0.2)
        assert run.stack is not None
        systems = [
            ("primary only", run.base, run.stack.procs["web"].pid),
            ("with 1 replica", replica_web.base_url, replica_web.procs["web"].pid),
        ]
        loads = [
            ("product listing, cache missed", {"READ_MODE": "listing"}),
            (
                f"product detail, {len(run.spread)} products",
                {
                    "READ_MODE": "detail",
                    "PRODUCT_LO": str(run.spread[0]),
                    "PRODUCT_HI": str(run.spread[-1]),
                },
            ),
        ]
        for scenario, env in loads:
            for system, base, web_pid in systems:
                groups = {
                    "web": [web_pid],
                    "postgres": [run.pg_pid()],
                    "replica": [standby.proc.pid],
                    "redis": [run.rd_pid()],
                }
                # Warm first: the pools' new connections, their plans and caches.
                warm = _seeded(env)
                wrk(base, "reads.lua", 1, warm, run.work, connections=args.read_connections)
                meter = CpuMeter(lambda groups=groups: groups)
                meter.start()
                stats = wrk(
                    base,
                    "reads.lua",
                    args.seconds,
                    _seeded(env),
                    run.work,
                    connections=args.read_connections,
                )
                cpu = meter.stop()
                cpu["generator"] = stats["generator_cpu_s"]
                row = read_row(scenario, system, stats, cpu)
                rows.append(row)
                print_progress(row)
    finally:
        replica_web.stop()
        standby.stop()

    per_s, p99_ms = CACHED_READS_TARGET
    web = run.stack.procs["web"].pid
    meter = CpuMeter(lambda: {"web": [web], "postgres": [run.pg_pid()], "redis": [run.rd_pid()]})
    hot = {"READ_MODE": "hot", "PRODUCT_LO": str(run.hot)}
    wrk(run.base, "reads.lua", 1, hot, run.work, connections=args.cached_read_connections)
    meter.start()
    stats = wrk(
        run.base,
        "reads.lua",
        args.seconds,
        hot,
        run.work,
        connections=args.cached_read_connections,
    )
    cpu = meter.stop()
    cpu["generator"] = stats["generator_cpu_s"]
    row = read_row("cached reads, 1 product", "this service", stats, cpu)
    row["target"] = f">= {per_s:,.0f}/s, p99 < {p99_ms:g} ms"
    row["met"] = row["per_s"] >= per_s and row["p99_ms"] < p99_ms and not row["non2xx"]
    rows.append(row)
    print_progress(row)
    return rows


# ---- progress -----------------------------------------------------------------


def print_progress(row: Row) -> None:
    client = f" [{row['client']}]" if "client" in row else ""
    print(
        f"  {row['scenario']} / {row['system']}{client}: {fmt(row.get('per_s'))}/s, "
        f"invariants {verdict(row)}",
        flush=True,
    )


# ---- main -----------------------------------------------------------------------


def csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--only",
        type=csv(str),
        default=[s for s in SCENARIOS if s not in NOT_BY_DEFAULT],
        help=f"comma list of scenarios: {','.join(SCENARIOS)} (default all but soak)",
    )
    p.add_argument("--seconds", type=int, default=15, help="wrk duration per load (default 15)")
    p.add_argument("--users", type=int, help="users of both closed-loop scenarios")
    p.add_argument("--spread-users", type=int, default=32, help="closed-spread users (32)")
    p.add_argument("--hot-users", type=int, default=64, help="closed-hot users (64)")
    p.add_argument(
        "--models",
        type=csv(str),
        default=list(MODELS),
        help="closed-loop clients: prefer (Prefer: wait, then polls), poll",
    )
    p.add_argument("--prefer-wait", type=int, default=5, help="Prefer: wait=N (default 5)")
    p.add_argument(
        "--web-processes",
        type=csv(int),
        default=[2, 4],
        help="gunicorn workers of each web-scaling load (default 2,4)",
    )
    p.add_argument(
        "--web-scaling-rate",
        type=float,
        default=400,
        help="the web-scaling scenario's fixed mixed rate, req/s (default 400)",
    )
    p.add_argument(
        "--web-scaling-seconds",
        type=float,
        default=20,
        help="length of each web-scaling mixed load (default 20)",
    )
    p.add_argument("--poll-wait", type=int, default=5, help="GET /v1/jobs/{id}?wait=N (default 5)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="closed-loop scenarios run this many times, this service and the straight "
        "design alternating; ratios per round and their median (default 1)",
    )
    p.add_argument(
        "--baseline-workers",
        type=csv(int),
        default=[4, 16],
        help="straight design's sync workers (default 4,16)",
    )
    p.add_argument("--no-baseline", action="store_true", help="skip the straight design")
    p.add_argument(
        "--mixed-rates",
        type=csv(float),
        default=[1000.0],
        help="offered rates of the mixed load (default 1000)",
    )
    p.add_argument("--mixed-seconds", type=float, default=60, help="per mixed rate (default 60)")
    p.add_argument(
        "--give-up-after",
        type=float,
        default=60,
        help="a mixed client stops awaiting a job after N s (default 60)",
    )
    p.add_argument(
        "--max-in-flight",
        type=int,
        default=5000,
        help="mixed: requests in flight before arrivals are dropped (default 5000)",
    )
    p.add_argument("--coupons", type=int, default=10, help="coupons of the mixed load")
    p.add_argument("--coupon-quantity", type=int, default=1000, help="totalQuantity of each")
    p.add_argument("--longpoll-clients", type=int, default=2000, help="polls held (2000)")
    p.add_argument("--longpoll-wait", type=int, default=30, help="their ?wait= (30)")
    p.add_argument("--longpoll-target-ms", type=float, default=50, help="allowed p99 increase (50)")
    p.add_argument(
        "--probe-rate",
        type=float,
        default=50,
        help="longpoll: reads/s and POSTs/s of the probe (default 50 each)",
    )
    p.add_argument("--probe-seconds", type=float, default=10, help="each probe's length (10)")
    p.add_argument(
        "--read-connections", type=int, default=32, help="reads: wrk connections (default 32)"
    )
    p.add_argument(
        "--cached-read-connections",
        type=int,
        default=4,
        help="reads: wrk connections of the cached single-product load (default 4: a closed"
        " loop of 16 on 2 cores measures its own queue, a p99 of ~50 ms at ~4,500/s)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=120,
        help="seconds a load's jobs may take to drain before it is a violation",
    )
    p.add_argument("--noop-tasks", type=int, default=5000, help="Celery ceiling's tasks")
    p.add_argument("--soak-minutes", type=float, default=30, help="soak: minutes of load (30)")
    p.add_argument("--soak-rate", type=float, default=300, help="soak: offered req/s (300)")
    p.add_argument(
        "--soak-retention-minutes",
        type=float,
        default=5,
        help="soak: JOB_RETENTION_HOURS of the stack, in minutes (default 5)",
    )
    p.add_argument(
        "--soak-partition-seconds",
        type=int,
        default=60,
        help="soak: JOB_PARTITION_SECONDS of the stack (default 60)",
    )
    p.add_argument(
        "--soak-sample-seconds", type=float, default=60, help="soak: sampling interval (60)"
    )
    p.add_argument(
        "--auth-requests", type=int, default=2000, help="auth: job POSTs per variant and round"
    )
    p.add_argument(
        "--stack-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the service's processes (repeatable)",
    )
    args = p.parse_args(argv)
    unknown = set(args.only) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenario(s) {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    if set(args.models) - set(MODELS):
        p.error(f"--models takes {', '.join(MODELS)}")
    if args.users:
        args.spread_users = args.hot_users = args.users
    if args.probe_seconds + 5 > args.longpoll_wait:
        p.error("--probe-seconds must end well inside --longpoll-wait")
    return args


def stack_env(args: argparse.Namespace) -> dict[str, str]:
    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
    env = {
        "LOG_LEVEL": "WARNING",
        # tests/stack.py sweeps at test speed; measure with the service's own defaults.
        "SWEEP_AFTER_SECONDS": str(defaults["sweep_after_seconds"]),
        "SWEEP_INTERVAL_SECONDS": str(defaults["sweep_interval_seconds"]),
        # No order may expire mid-run: the stock check counts every order not FAILED.
        "ORDER_PAYMENT_TIMEOUT_SECONDS": "86400",
    }
    if "soak" in args.only:
        env["JOB_RETENTION_HOURS"] = repr(args.soak_retention_minutes / 60)
        env["JOB_PARTITION_SECONDS"] = str(args.soak_partition_seconds)
    for item in args.stack_env:
        name, _, value = item.partition("=")
        env[name] = value
    return env


def plan(run: Run) -> list[tuple[str, Callable[[], list[Row]]]]:
    steps: list[tuple[str, Callable[[], list[Row]]]] = []
    if "ceilings" in run.args.only:
        steps += [
            ("ceilings", lambda: ceiling_http(run)),
            ("ceilings", lambda: ceiling_celery(run)),
        ]
    for name in run.args.only:
        if name == "open":
            steps.append((name, lambda: open_loop(run)))
        elif name.startswith("closed-"):
            steps.append((name, lambda name=name: closed_loop(run, name)))
        elif name == "web-scaling":
            steps.append((name, lambda: web_scaling(run)))
        elif name == "mixed":
            steps.append((name, lambda: mixed(run)))
        elif name == "longpoll":
            steps.append((name, lambda: longpoll(run)))
        elif name == "reads":
            steps.append((name, lambda: reads(run)))
        elif name == "auth":
            steps.append((name, lambda: auth(run)))
        elif name == "soak":
            steps.append((name, lambda: soak_run(run)))
    return steps


def auth(run: Run) -> list[Row]:
    """Identity's cost (issue 18): web CPU per job POST, none against jwt HS256 / RS256."""
    return auth_cost.measure(
        run.pg.url,
        run.rd.url,
        run.work / "logs",
        stack_env(run.args),
        requests_per_round=run.args.auth_requests,
    )


def start_service(run: Run) -> None:
    """The stack, and the products and coupons every service scenario shares."""
    run.stack = Stack(
        run.pg.url,
        run.rd.url,
        run.work / "logs",
        admin_token=ADMIN_TOKEN,
        extra_env=stack_env(run.args),
    ).start_all()
    wait_idle([p.pid for p in run.stack.procs.values()])
    run.hot, *run.spread = create_products(run.base, "bench", 201)
    run.baseline_hot, *run.baseline_spread = create_products(run.base, "baseline", 201)
    run.coupons = create_coupons(run.base, run.args.coupons, run.args.coupon_quantity)


@contextmanager
def servers(args: argparse.Namespace, keep_as: str | None = None) -> Iterator[Run]:
    """A run's own PostgreSQL (migrated) and Redis in a temporary folder, the stack
    stopped and both servers after; ``keep_as``: the folder is copied (without the
    database) to ``bench/results/<keep_as>-work``."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        pg, rd = EmbeddedPostgres(work / "pg" / "data"), EmbeddedRedis(work / "redis")
        pg.start()
        rd.start()
        run = Run(args, work, pg, rd)
        try:
            migrate(pg.url)
            yield run
        finally:
            if run.stack is not None:
                run.stack.stop()
            rd.stop()
            pg.stop()
            if keep_as is not None:
                shutil.copytree(
                    work, RESULTS / f"{keep_as}-work", ignore=shutil.ignore_patterns("pg")
                )


def execute(args: argparse.Namespace, stamp: str) -> list[Row]:
    rows: list[Row] = []
    keep_as = stamp if os.environ.get("BENCH_KEEP_LOGS") else None
    with servers(args, keep_as) as run:
        for name, step in plan(run):
            if name != "ceilings" and run.stack is None:
                start_service(run)
            print(f"{name} ...", flush=True)
            try:
                rows += step()
            except Exception as exc:  # one scenario's failure must not hide the others
                traceback.print_exc()
                rows.append(
                    {"section": "crash", "scenario": name, "system": "-", "crashed": repr(exc)}
                )
    return rows


def strict(value: Any) -> Any:
    """JSON has no NaN: None instead (a ratio or rate that could not be computed)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if shutil.which("wrk") is None:
        print(
            "wrk is not installed: `make bench` installs it (apt-get install wrk)", file=sys.stderr
        )
        return 2
    RESULTS.mkdir(exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    meta = {
        "stamp": now.strftime("%Y-%m-%d %H:%M UTC"),
        "host": os.uname().nodename,
        "cores": os.cpu_count(),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "argv": " ".join(sys.argv[1:] if argv is None else argv),
        "stack_env": stack_env(args),
    }
    rows = execute(args, stamp)
    rows += [{"section": "scaling", **row} for row in scaling_rows(rows)]
    ratio_rows = ratios(rows)
    text = markdown(rows, ratio_rows, meta)
    (RESULTS / f"{stamp}.json").write_text(
        json.dumps(strict({"meta": meta, "rows": rows, "ratios": ratio_rows}), indent=2)
    )
    for row in (r for r in rows if r.get("section") == "soak"):
        text += "\n\n" + soak.markdown(row)
        soak.plot(row, RESULTS / f"{stamp}-soak.png")
    (RESULTS / f"{stamp}.md").write_text(text + "\n")
    plot(rows, RESULTS / f"{stamp}.png")
    print()
    print(text)
    print(f"\nwritten: bench/results/{stamp}.{{json,md,png}}")
    failed = [r for r in rows if r.get("violations") or r.get("crashed")]
    if failed:
        print(f"\nFAILED: {len(failed)} row(s): invariants violated or a crash", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
