"""The tables (Markdown, also printed) and the plot of one ``bench/run.py`` run."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

Row = dict[str, Any]
Column = tuple[str, Callable[[Row], str]]

CPU_GROUPS = ("web", "worker", "history", "beat", "postgres", "replica", "redis", "generator")


def fmt(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}"
    return str(value)


def verdict(row: Row) -> str:
    if row.get("crashed"):
        return "CRASHED"
    return f"VIOLATED ({len(row['violations'])})" if row.get("violations") else "ok"


def col(header: str, key: str, digits: int = 0) -> Column:
    return header, lambda r: fmt(r.get(key), digits)


def before_after(key: str) -> Callable[[Row], str]:
    return lambda r: (
        f"{fmt(r[key + '_unloaded_ms'], 1)} → {fmt(r[key + '_loaded_ms'], 1)} "
        f"({fmt(r[key + '_delta_ms'], 1)})"
    )


NAME: list[Column] = [col("scenario", "scenario"), col("system", "system")]
INVARIANTS: Column = ("invariants", verdict)

CLOSED: list[Column] = [
    *NAME,
    col("client", "client"),
    col("orders/s", "per_s"),
    col("cycle p50 ms", "cycle_p50_ms", 1),
    col("cycle p99 ms", "cycle_p99_ms", 1),
    col("request p99 ms", "request_p99_ms", 1),
    col("requests/cycle", "requests_per_cycle", 2),
    ("one-request %", lambda r: fmt(100 * r["one_request_share"])),
    col("FAILED jobs", "failed_jobs"),
    col("non-2xx", "non2xx"),
    col("errors", "errors"),
    INVARIANTS,
]

RATIOS: list[Column] = [
    col("scenario", "scenario"),
    col("client", "client"),
    col("against", "against"),
    ("orders/s ratio", lambda r: fmt(r["orders_ratio"], 2) + "x"),
    ("cycle p99 ratio", lambda r: fmt(r["p99_ratio"], 2) + "x"),
    col("target", "target"),
    col("met", "met"),
]

SCALING: list[Column] = [
    col("load", "scaling_load"),
    col("web processes", "web_processes"),
    col("jobs/s", "per_s"),
    col("web ms/job", "web_ms", 3),
    col("total ms/job", "total_ms", 3),
    col("against", "against"),
    ("CPU/job ratio", lambda r: fmt(r["cpu_ratio"], 2) + "x"),
    ("not grown (<= 1.05x)", lambda r: fmt(r["met"])),
]

MIXED: list[Column] = [
    *NAME,
    col("offered/s", "offered_per_s"),
    col("jobs offered/s", "jobs_offered_per_s"),
    col("accepted/s", "accepted_per_s"),
    col("completed/s", "completed_per_s"),
    col("completion p50 ms", "completion_p50_ms", 1),
    col("completion p99 ms", "completion_p99_ms", 1),
    col("read p99 ms", "read_p99_ms", 1),
    col("errors", "errors"),
    (
        "backlog max (worst partition)",
        lambda r: f"{fmt(r['backlog']['max_total'])} ({fmt(r['backlog']['max_partition'])})",
    ),
    ("backlog at end of load", lambda r: fmt(r["backlog"]["at_end_of_load"])),
    col("drain s", "drain_s", 1),
    col("generator lag ms", "generator_lag_ms", 1),
    INVARIANTS,
]

LONGPOLL: list[Column] = [
    *NAME,
    col("held", "held"),
    ("read p99 ms unloaded → loaded (Δ)", before_after("read_p99")),
    ("POST p99 ms unloaded → loaded (Δ)", before_after("post_p99")),
    col("within target", "met"),
    col("woken p99 ms", "woken_p99_ms", 1),
    col("errors", "errors"),
    INVARIANTS,
]

OPEN: list[Column] = [
    *NAME,
    col("accepted/s", "per_s"),
    col("p50 ms", "p50_ms", 1),
    col("p99 ms", "p99_ms", 1),
    col("applied/s (under load)", "applied_per_s"),
    col("drain/s (after)", "drain_per_s"),
    col("non-2xx", "non2xx"),
    col("errors", "errors"),
    INVARIANTS,
]

READS: list[Column] = [
    *NAME,
    col("reads/s", "per_s"),
    col("p50 ms", "p50_ms", 1),
    col("p99 ms", "p99_ms", 1),
    col("non-2xx", "non2xx"),
    col("errors", "errors"),
    ("primary CPU ms/read", lambda r: fmt(r["cpu_ms_per_job"].get("postgres"), 3)),
    ("replica CPU ms/read", lambda r: fmt(r["cpu_ms_per_job"].get("replica"), 3)),
    col("target", "target"),
    col("met", "met"),
]

CEILINGS: list[Column] = [
    *NAME,
    col("per s", "per_s"),
    col("p50 ms", "p50_ms", 1),
    col("p99 ms", "p99_ms", 1),
    col("note", "note"),
]


def cores_busy(row: Row) -> str:
    """CPU seconds of every group over the measured window's seconds: how much of the
    machine the load kept busy (2.00: two whole cores)."""
    wall = row.get("cpu_wall_s")
    return fmt(sum(row["cpu_s"].values()) / wall, 2) if wall and row.get("cpu_s") else "-"


CPU: list[Column] = [
    col("scenario", "scenario"),
    ("system", lambda r: r["system"] + (f" ({r['client']})" if "client" in r else "")),
    *[(g, lambda r, g=g: fmt(r["cpu_ms_per_job"].get(g), 3)) for g in CPU_GROUPS],
    ("total", lambda r: fmt(sum(r["cpu_ms_per_job"].values()), 3)),
    col("jobs", "jobs"),
    ("cores busy", cores_busy),
]

AUTH: list[Column] = [
    *NAME,
    col("web CPU ms/POST (median round)", "web_cpu_ms", 3),
    ("rounds ms", lambda r: ", ".join(fmt(v, 3) for v in r["rounds_ms"])),
    ("vs none", lambda r: f"{r['overhead_pct']:+.1f} %"),
    col("POSTs", "requests"),
    col("non-202", "non202"),
]

SECTIONS: list[tuple[str, str, list[Column]]] = [
    ("closed", "Closed loop (wrk, one user per connection)", CLOSED),
    ("ratios", "Ratios: this service / straight design (closed loop)", RATIOS),
    ("scaling", "Scaling with web processes (per load, against its fewest processes)", SCALING),
    ("mixed", "Open loop mixed, every job awaited (bench/loadgen.py)", MIXED),
    ("longpoll", "Long polls held (worker stopped; probe reads and order POSTs)", LONGPOLL),
    ("open", "Open loop, fire and forget (wrk, 64 connections)", OPEN),
    ("reads", "Product reads (wrk): primary only, with a streaming replica, cached", READS),
    ("ceiling", "Ceilings", CEILINGS),
    ("auth", "Identity: web CPU per job POST, AUTH_MODE none against jwt", AUTH),
    ("cpu", "CPU per completed job (ms; process trees, over the load and its drain)", CPU),
]


TEXT_COLUMNS = {
    "scenario",
    "system",
    "client",
    "against",
    "target",
    "met",
    "note",
    "invariants",
    "not grown (<= 1.05x)",
    "load",
}


def md_table(columns: list[Column], rows: list[Row]) -> str:
    out = [
        "| " + " | ".join(h for h, _ in columns) + " |",
        "|" + "|".join("---" if h in TEXT_COLUMNS else "---:" for h, _ in columns) + "|",
    ]
    out += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]
    return "\n".join(out)


def markdown(rows: list[Row], ratio_rows: list[Row], meta: dict[str, Any]) -> str:
    parts = [
        f"Run {meta['stamp']} on {meta['host']}: `python -m bench.run {meta['argv']}` "
        f"({meta['cores']} cores, load average {meta['loadavg']} at start)."
    ]
    for section, title, columns in SECTIONS:
        if section == "ratios":
            chosen = ratio_rows
        elif section == "cpu":
            chosen = [r for r in rows if r.get("cpu_ms_per_job")]
        else:
            chosen = [r for r in rows if r.get("section") == section]
        if chosen:
            parts += [f"### {title}", md_table(columns, chosen)]
    bad = [r for r in rows if r.get("violations") or r.get("crashed")]
    if bad:
        parts.append("### Violations")
        parts += [
            f"- {r['scenario']} / {r['system']}: {v}"
            for r in bad
            for v in (r.get("violations") or [r.get("crashed", "")])
        ]
    return "\n\n".join(parts)


def _bars(ax: Any, groups: list[tuple[str, list[float]]], labels: list[str]) -> None:
    width = 0.8 / len(groups)
    for k, (label, values) in enumerate(groups):
        offset = (k - (len(groups) - 1) / 2) * width
        ax.bar([x + offset for x in range(len(values))], values, width, label=label)
    ax.set_xticks(range(len(labels)), labels)


_LABEL_WORDS = [
    ("closed loop, ", ""),
    (" users, 200 products", " users spread"),
    (" users, 1 hot product", " users hot"),
    (", round ", ", r"),
    (" web processes", " web"),
    ("straight design, ", "straight "),
    (" sync workers", "w"),
    ("this service", "service"),
    ("one POST (200)", ""),
]


def _closed_label(row: Row) -> str:
    """A closed-loop bar's label, short enough for many bars (rounds, web processes)."""
    text = f"{row['scenario']}\n{row['system']} {row['client']}"
    for long, short in _LABEL_WORDS:
        text = text.replace(long, short)
    return text.strip()


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    closed = [r for r in rows if r.get("section") == "closed"]
    labels = [_closed_label(r) for r in closed]
    colors = ["tab:blue" if r["system"] == "this service" else "tab:gray" for r in closed]
    for ax, key, title in (
        (axes[0][0], "per_s", "closed loop: orders completed per second"),
        (axes[0][1], "cycle_p99_ms", "closed loop: cycle p99, ms"),
    ):
        ax.bar(range(len(closed)), [r[key] for r in closed], color=colors)
        # Rounds and web-process counts make many bars: upright labels then.
        rotation = 90 if len(closed) > 12 else 35
        ax.set_xticks(range(len(closed)), labels, rotation=rotation, ha="right", fontsize=6)
        ax.set_title(f"{title} (blue: this service, grey: straight design)", fontsize=9)
    mixed = [r for r in rows if r.get("section") == "mixed"]
    rates = [
        r["scenario"]
        .removeprefix("mixed open loop, ")
        .replace(" req/s offered", "/s")
        .replace(" web processes", " web")
        for r in mixed
    ]
    if mixed:
        ax = axes[1][0]
        _bars(
            ax,
            [
                ("offered/s", [r["offered_per_s"] for r in mixed]),
                ("accepted/s", [r["accepted_per_s"] for r in mixed]),
                ("completed/s", [r["completed_per_s"] for r in mixed]),
            ],
            rates,
        )
        for r in rows:
            if r.get("section") == "open" and r["scenario"] == "orders, 200 products":
                ax.axhline(r["per_s"], linestyle=":", color="gray", linewidth=1)
                ax.annotate(f"open loop orders: {r['system']}", (0, r["per_s"]), fontsize=6)
        ax.legend(fontsize=7)
        ax.set_title("open loop mixed: per second", fontsize=9)
        ax = axes[1][1]
        _bars(
            ax,
            [
                ("completion p50 ms", [r["completion_p50_ms"] or 0 for r in mixed]),
                ("completion p99 ms", [r["completion_p99_ms"] or 0 for r in mixed]),
            ],
            rates,
        )
        ax.axhline(1000, color="red", linestyle="--", linewidth=1, label="target p99 1 s")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.set_title("open loop mixed: completion latency (log scale)", fontsize=9)
    else:  # a run without the mixed load: no empty frames
        for ax in axes[1]:
            ax.axis("off")
    fig.suptitle("Shop back end vs the straight design (one run, the same 2 cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
