"""Load harness: the service beside its ceilings and the original design, in one run.

``make bench`` (or ``python -m bench.run``) starts private PostgreSQL and Redis
servers, then measures with wrk (64 connections, 2 threads):

* ceilings: gunicorn + Flask on an empty route; a solo Celery worker draining
  no-op tasks through Redis;
* the service (gunicorn + partition worker): orders spread over 200 products,
  orders on one hot product, point charges on one hot user.  "accepted" is what
  wrk saw answered 202; "applied" is read back over HTTP (stock taken, balance
  charged) during the load, and "drain" is the rate after the load stops;
* the original design (``bench/baseline_app.py``: the order taken in the request
  with ``SELECT ... FOR UPDATE``), spread and hot, with 4 and 16 sync workers.

Writes ``bench/results/<timestamp>.json``, ``.md`` (the table) and ``.png`` (the plot).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis
import requests

from shared.embedded import EmbeddedPostgres, EmbeddedRedis, free_port, migrate
from tests.stack import BIN, ROOT, Stack

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
STOCK = 1_000_000_000
ADMIN_TOKEN = "bench-admin-token"


@dataclass
class Row:
    scenario: str
    system: str
    accepted_per_s: float
    p50_ms: float
    p99_ms: float
    applied_per_s: float | None = None
    drain_per_s: float | None = None
    non2xx: int = 0
    note: str = ""


def wrk(
    url: str, script: str, seconds: int, env: dict[str, str], connections: int = 64
) -> dict[str, Any]:
    out = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{seconds}s",
            "--timeout",
            "10s",
            "-s",
            str(HERE / "wrk" / script),
            url,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "WRK_DIR": str(HERE / "wrk"), **env},
        check=True,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("WRK_JSON "))
    stats: dict[str, Any] = json.loads(line.removeprefix("WRK_JSON "))
    stats["per_s"] = stats["requests"] / (stats["duration_us"] / 1e6)
    return stats


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
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---- ceilings -----------------------------------------------------------------


def ceiling_http(seconds: int, log_dir: Path) -> Row:
    port = free_port()
    proc = gunicorn(
        "bench.ceiling_app:app",
        port,
        {},
        ["--worker-class", "gthread", "--workers", "2", "--threads", "32"],
        log_dir / "ceiling.log",
    )
    try:
        stats = wrk(f"http://127.0.0.1:{port}", "get.lua", seconds, {"WRK_PATH": "/empty"})
    finally:
        stop(proc)
    return Row(
        "ceiling: empty route",
        "gunicorn+Flask",
        stats["per_s"],
        stats["p50_us"] / 1e3,
        stats["p99_us"] / 1e3,
        non2xx=stats["non2xx"],
    )


def ceiling_celery(redis_url: str, tasks: int, log_dir: Path) -> Row:
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
        stdout=(log_dir / "noop.log").open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        while client.llen("bench-noop") == tasks:
            time.sleep(0.01)
        started = time.monotonic()
        start_len = client.llen("bench-noop")
        while client.llen("bench-noop") > 0:
            time.sleep(0.05)
        elapsed = time.monotonic() - started
    finally:
        stop(proc)
    return Row(
        "ceiling: no-op task", "Celery solo+Redis", start_len / elapsed, 0, 0, note=f"{tasks} tasks"
    )


# ---- the service ----------------------------------------------------------------


def applied_orders(base: str, product_ids: list[int]) -> int:
    taken = 0
    for product_id in product_ids:
        taken += (
            STOCK - requests.get(f"{base}/v1/products/{product_id}", timeout=10).json()["stock"]
        )
    return taken


def charged_points(base: str, user: int) -> int:
    return int(requests.get(f"{base}/v1/points/{user}", timeout=10).json()["amount"])


def measure_applied(probe: Any, run_load: Any, seconds: int) -> tuple[dict[str, Any], float, float]:
    """Run the load while sampling ``probe`` (applied so far); then time the drain."""
    before = probe()
    t0 = time.monotonic()
    stats = run_load()
    during = probe() - before
    elapsed = time.monotonic() - t0
    # Drain: until two reads a second apart agree.
    drained_from, t_drain = probe(), time.monotonic()
    last = drained_from
    while True:
        time.sleep(1.0)
        now = probe()
        if now == last:
            break
        last = now
    drain_elapsed = max(time.monotonic() - t_drain - 1.0, 1e-3)
    drain_rate = (last - drained_from) / drain_elapsed if last > drained_from else float("nan")
    return stats, during / elapsed, drain_rate


def create_products(base: str, prefix: str, count: int) -> list[int]:
    """Products with a stock no run can exhaust, created through the API."""
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    return [
        requests.post(
            f"{base}/v1/products",
            json={"name": f"{prefix} {i}", "price": 100, "stock": STOCK},
            headers=headers,
            timeout=10,
        ).json()["id"]
        for i in range(count)
    ]


def service_rows(stack: Stack, seconds: int) -> list[Row]:
    base = stack.base_url
    ids = create_products(base, "bench", 201)
    hot, spread = ids[0], ids[1:]
    rows = []
    for scenario, lo, hi, probe_ids in (
        ("orders, 200 products", spread[0], spread[-1], spread),
        ("orders, 1 hot product", hot, hot, [hot]),
    ):
        stats, applied, drain = measure_applied(
            lambda p=probe_ids: applied_orders(base, p),
            lambda lo=lo, hi=hi: wrk(
                base, "orders.lua", seconds, {"PRODUCT_LO": str(lo), "PRODUCT_HI": str(hi)}
            ),
            seconds,
        )
        rows.append(
            Row(
                scenario,
                "queue (this service)",
                stats["per_s"],
                stats["p50_us"] / 1e3,
                stats["p99_us"] / 1e3,
                applied,
                drain,
                stats["non2xx"],
            )
        )
    user = 900_000_001
    stats, applied, drain = measure_applied(
        lambda: charged_points(base, user),
        lambda: wrk(base, "points.lua", seconds, {"USER_LO": str(user), "USER_HI": str(user)}),
        seconds,
    )
    rows.append(
        Row(
            "point charges, 1 hot user",
            "queue (this service)",
            stats["per_s"],
            stats["p50_us"] / 1e3,
            stats["p99_us"] / 1e3,
            applied,
            drain,
            stats["non2xx"],
        )
    )
    return rows


def baseline_rows(database_url: str, base_service: str, seconds: int, log_dir: Path) -> list[Row]:
    ids = create_products(base_service, "baseline", 201)
    rows = []
    for workers in (4, 16):
        port = free_port()
        proc = gunicorn(
            "bench.baseline_app:app",
            port,
            {"BASELINE_DATABASE_URL": database_url},
            ["--workers", str(workers)],
            log_dir / "baseline.log",
        )
        try:
            for scenario, lo, hi in (
                ("orders, 200 products", ids[1], ids[-1]),
                ("orders, 1 hot product", ids[0], ids[0]),
            ):
                stats = wrk(
                    f"http://127.0.0.1:{port}",
                    "orders.lua",
                    seconds,
                    {"PRODUCT_LO": str(lo), "PRODUCT_HI": str(hi)},
                )
                rows.append(
                    Row(
                        scenario,
                        f"original design, {workers} sync workers",
                        stats["per_s"],
                        stats["p50_us"] / 1e3,
                        stats["p99_us"] / 1e3,
                        stats["per_s"],
                        None,
                        stats["non2xx"],
                        "applied in the request",
                    )
                )
        finally:
            stop(proc)
    return rows


# ---- report ---------------------------------------------------------------------


def fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.0f}"


def table(rows: list[Row]) -> str:
    lines = [
        "| scenario | system | accepted/s | p50 ms | p99 ms "
        "| applied/s (under load) | drain/s (after) | non-2xx |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.scenario} | {r.system} | {fmt(r.accepted_per_s)} | {r.p50_ms:.1f} "
            f"| {r.p99_ms:.1f} | {fmt(r.applied_per_s)} | {fmt(r.drain_per_s)} | {r.non2xx} |"
        )
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.scenario}\n{r.system}" for r in rows]
    accepted = [r.accepted_per_s for r in rows]
    applied = [r.applied_per_s or 0 for r in rows]
    fig, ax = plt.subplots(figsize=(12, 6))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], accepted, width=0.4, label="accepted/s (HTTP answers)")
    ax.bar([x + 0.2 for x in xs], applied, width=0.4, label="applied/s (under load)")
    ax.axhline(1000, color="red", linestyle="--", linewidth=1, label="target 1,000 req/s")
    ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("per second")
    ax.set_title("Shop back end vs ceilings and the original design (same run, 2 cores)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run")
    parser.add_argument("--seconds", type=int, default=15, help="wrk duration per scenario")
    parser.add_argument("--noop-tasks", type=int, default=5000)
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print(
            "wrk is not installed: `make bench` installs it (apt-get install wrk)", file=sys.stderr
        )
        return 2
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        pg, rd = EmbeddedPostgres(work / "pg" / "data"), EmbeddedRedis(work / "redis")
        pg.start()
        rd.start()
        stack: Stack | None = None
        try:
            migrate(pg.url)
            rows = [
                ceiling_http(args.seconds, work),
                ceiling_celery(rd.url.replace("/0", "/5"), args.noop_tasks, work),
            ]
            stack = Stack(
                pg.url,
                rd.url,
                work / "logs",
                admin_token=ADMIN_TOKEN,
                extra_env={"LOG_LEVEL": "WARNING"},
            )
            stack.start_all()
            rows += service_rows(stack, args.seconds)
            rows += baseline_rows(pg.url, stack.base_url, args.seconds, work)
        finally:
            if stack is not None:
                stack.stop()
            rd.stop()
            pg.stop()
    report = table(rows)
    (RESULTS / f"{stamp}.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
    (RESULTS / f"{stamp}.md").write_text(report + "\n")
    plot(rows, RESULTS / f"{stamp}.png")
    print(report)
    print(f"\nwritten: bench/results/{stamp}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
