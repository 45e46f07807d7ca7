"""The soak run (``--only soak``): the mixed load for a long time with retention shortened.

``bench/run.py`` starts the stack with ``JOB_RETENTION_HOURS`` and
``JOB_PARTITION_SECONDS`` shortened (``--soak-retention-minutes``,
``--soak-partition-seconds``), runs the mixed open-loop load (``bench/loadgen.py``) at
``--soak-rate`` for ``--soak-minutes``, and samples every ``--soak-sample-seconds``:

* rows (exact counts) and bytes (heap + TOAST, and indexes) of ``jobs`` and ``outbox``
  over all their partitions, how many partitions, dead tuples, autovacuum runs (summed
  over every partition ever seen, so dropped ones still count);
* PostgreSQL's memory (PSS of the postmaster and its children: shared buffers counted
  once) and Redis's (``used_memory`` and RSS).

Completion latency comes from the load generator per minute of finishing time.  Pass:

* storage stops growing once the retention window is full: after
  ``retention + 2 partition widths + 1 minute``, the largest size of the second half of
  the remaining samples is within 15 % of the largest of the first half;
* completion p99 of the last five minutes within 20 % of the first five after warm-up
  (one minute); on a run shorter than eleven minutes, two halves of what follows the
  warm-up instead;
* the invariants hold exactly at the end (``bench/checks.py``, the parts that do not
  need the jobs: finished jobs are gone by then, as they should be).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis

from bench import checks

WARM_UP_S = 60
GROWTH_ALLOWED = 1.15
P99_ALLOWED = 1.20

SIZES = """
SELECT t.parent, c.oid, coalesce(pg_table_size(c.oid), 0), coalesce(pg_indexes_size(c.oid), 0),
       coalesce(s.n_dead_tup, 0), coalesce(s.autovacuum_count, 0),
       coalesce(s.autoanalyze_count, 0)
FROM (SELECT 'jobs' AS parent, relid FROM pg_partition_tree('jobs') WHERE isleaf
      UNION ALL
      SELECT 'outbox', relid FROM pg_partition_tree('outbox') WHERE isleaf) t
JOIN pg_class c ON c.oid = t.relid
LEFT JOIN pg_stat_user_tables s ON s.relid = t.relid
"""
COUNTS = "SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM outbox)"


def _children(pid: int) -> list[int]:
    found = [pid]
    table: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        table.setdefault(ppid, []).append(int(entry))
    queue = [pid]
    while queue:
        for child in table.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def pss_bytes(pid: int) -> int:
    """Proportional set size of ``pid`` and its descendants (shared pages counted once)."""
    total = 0
    for p in _children(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


@dataclass
class SoakSampler:
    """Storage and memory every ``interval`` seconds, in a thread."""

    pg_url: str
    redis_url: str
    pg_pid: int
    interval: float = 60.0
    samples: list[dict[str, Any]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    _autovacuums: dict[int, tuple[int, int]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="soak", daemon=True)
        self._thread.start()

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        return self.samples

    def _run(self) -> None:
        started = time.monotonic()
        rd = redis.Redis.from_url(self.redis_url)
        with checks.connect(self.pg_url) as conn:
            while True:
                try:
                    self.samples.append(self.sample(conn, rd, time.monotonic() - started))
                except psycopg.Error as exc:  # e.g. a partition dropped under the sample
                    self.failed.append(f"{time.monotonic() - started:.0f} s: {exc}")
                if self._stop.wait(self.interval):
                    break
        rd.close()

    def sample(self, conn: Any, rd: redis.Redis, at: float) -> dict[str, Any]:
        out: dict[str, Any] = {"t_s": round(at, 1)}
        for parent in ("jobs", "outbox"):
            out[parent] = {"partitions": 0, "table_bytes": 0, "index_bytes": 0, "dead": 0}
        for parent, oid, table, index, dead, vacuums, analyzes in conn.execute(SIZES):
            entry = out[parent]
            entry["partitions"] += 1
            entry["table_bytes"] += int(table)
            entry["index_bytes"] += int(index)
            entry["dead"] += int(dead)
            self._autovacuums[int(oid)] = (int(vacuums), int(analyzes))
        jobs_rows, outbox_rows = conn.execute(COUNTS).fetchone()
        out["jobs"]["rows"], out["outbox"]["rows"] = int(jobs_rows), int(outbox_rows)
        out["autovacuums"] = sum(v for v, _ in self._autovacuums.values())
        out["autoanalyzes"] = sum(a for _, a in self._autovacuums.values())
        out["pg_pss_bytes"] = pss_bytes(self.pg_pid)
        info: dict[str, Any] = rd.info("memory")  # type: ignore[assignment]  # sync client
        out["redis_used_bytes"] = int(info["used_memory"])
        out["redis_rss_bytes"] = int(info["used_memory_rss"])
        return out


def storage_bytes(sample: dict[str, Any]) -> int:
    return sum(sample[t]["table_bytes"] + sample[t]["index_bytes"] for t in ("jobs", "outbox"))


def evaluate(
    samples: list[dict[str, Any]],
    by_minute: list[dict[str, Any]],
    *,
    retention_s: float,
    width_s: float,
    minutes: float,
) -> dict[str, Any]:
    """The pass criteria of the module docstring, with the figures they were judged on."""
    full_at = retention_s + 2 * width_s + 60
    steady = [s for s in samples if s["t_s"] >= full_at]
    verdict: dict[str, Any] = {"window_full_at_s": full_at}
    if len(steady) >= 4:
        half = len(steady) // 2
        first = max(storage_bytes(s) for s in steady[:half])
        second = max(storage_bytes(s) for s in steady[half:])
        verdict["storage_first_half_max_bytes"] = first
        verdict["storage_second_half_max_bytes"] = second
        verdict["storage_flat"] = second <= first * GROWTH_ALLOWED
    else:
        verdict["storage_flat"] = None  # too short a run to tell
    minutes_after = [m for m in by_minute if m["from_s"] >= WARM_UP_S and m["p99_ms"] is not None]
    span = 5 if minutes >= 11 else max(1, len(minutes_after) // 2)
    if len(minutes_after) >= 2:
        first_p99 = statistics.median(m["p99_ms"] for m in minutes_after[:span])
        last_p99 = statistics.median(m["p99_ms"] for m in minutes_after[-span:])
        verdict.update(
            p99_window_minutes=span,
            p99_first_ms=first_p99,
            p99_last_ms=last_p99,
            p99_flat=last_p99 <= first_p99 * P99_ALLOWED,
        )
    else:
        verdict["p99_flat"] = None
    return verdict


def markdown(row: dict[str, Any]) -> str:
    mib = 1024 * 1024
    lines = [
        "### Soak: storage, vacuum and memory per sample (bench/soak.py)",
        f"{row['scenario']}; retention {row['retention_s']:g} s, partitions"
        f" {row['partition_s']:g} s wide.",
        "",
        "| t (s) | jobs rows | jobs parts | jobs MiB (heap+idx) | jobs dead | outbox rows"
        " | outbox MiB | autovacuums | PG PSS MiB | Redis used MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in row["samples"]:
        j, o = s["jobs"], s["outbox"]
        lines.append(
            f"| {s['t_s']:.0f} | {j['rows']:,} | {j['partitions']} |"
            f" {j['table_bytes'] / mib:.1f}+{j['index_bytes'] / mib:.1f} | {j['dead']:,} |"
            f" {o['rows']:,} | {(o['table_bytes'] + o['index_bytes']) / mib:.1f} |"
            f" {s['autovacuums']} | {s['pg_pss_bytes'] / mib:.0f} |"
            f" {s['redis_used_bytes'] / mib:.1f} |"
        )
    lines += ["", "| minute | completed | p50 ms | p99 ms |", "|---:|---:|---:|---:|"]
    for m in row["by_minute"]:
        lines.append(f"| {m['from_s'] / 60:.0f} | {m['n']} | {m['p50_ms']} | {m['p99_ms']} |")
    v = row["verdict"]
    lines += [
        "",
        f"Storage flat once the window is full (after {v['window_full_at_s']:.0f} s):"
        f" {v.get('storage_flat')} (largest {v.get('storage_first_half_max_bytes', 0) / mib:.1f}"
        f" MiB, then {v.get('storage_second_half_max_bytes', 0) / mib:.1f} MiB; allowed"
        f" +{(GROWTH_ALLOWED - 1) * 100:.0f} %).",
        f"Completion p99 flat: {v.get('p99_flat')} (first {v.get('p99_window_minutes')} min"
        f" after warm-up {v.get('p99_first_ms')} ms, last {v.get('p99_last_ms')} ms; allowed"
        f" +{(P99_ALLOWED - 1) * 100:.0f} %).",
        f"Invariants at the end: {'hold' if not row['violations'] else row['violations']}.",
    ]
    return "\n".join(lines)


def plot(row: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = row["samples"]
    t = [s["t_s"] / 60 for s in samples]
    mib = 1024 * 1024
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    ax = axes[0][0]
    for name in ("jobs", "outbox"):
        ax.plot(t, [s[name]["table_bytes"] / mib for s in samples], label=f"{name} heap")
        ax.plot(t, [s[name]["index_bytes"] / mib for s in samples], "--", label=f"{name} indexes")
    ax.axvline(row["verdict"]["window_full_at_s"] / 60, color="gray", linestyle=":")
    ax.set_title("storage, MiB (dotted: retention window full)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[0][1]
    ax.plot(t, [s["jobs"]["rows"] for s in samples], label="jobs rows")
    ax.plot(t, [s["outbox"]["rows"] for s in samples], label="outbox rows")
    ax.plot(t, [s["jobs"]["dead"] for s in samples], label="jobs dead tuples")
    ax2 = ax.twinx()
    ax2.plot(t, [s["autovacuums"] for s in samples], color="black", linewidth=0.8)
    ax2.set_ylabel("autovacuum runs (black)", fontsize=8)
    ax.set_title("rows, dead tuples, autovacuum runs", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1][0]
    minutes = row["by_minute"]
    ax.plot([m["from_s"] / 60 for m in minutes], [m["p50_ms"] for m in minutes], label="p50")
    ax.plot([m["from_s"] / 60 for m in minutes], [m["p99_ms"] for m in minutes], label="p99")
    ax.set_title("completion latency per minute, ms", fontsize=9)
    ax.set_xlabel("minute")
    ax.legend(fontsize=7)
    ax = axes[1][1]
    ax.plot(t, [s["pg_pss_bytes"] / mib for s in samples], label="PostgreSQL PSS")
    ax.plot(t, [s["redis_rss_bytes"] / mib for s in samples], label="Redis RSS")
    ax.set_title("memory, MiB", fontsize=9)
    ax.set_xlabel("minute")
    ax.legend(fontsize=7)
    fig.suptitle(row["scenario"])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
