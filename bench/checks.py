"""What must hold after every load, read with SQL from the database itself.

* stock: for every product, stock taken (initial stock - stock) = units of the
  order lines of its orders not FAILED, and for the service's products also =
  units of its SUCCEEDED ``ORDER_CREATE`` jobs;
* points: every user's balance = SUCCEEDED charges - uses - payments (from the
  jobs) = the signed sum of its point histories, and = its last ``balance_after``;
* coupons: ``issued_quantity`` = SUCCEEDED ``COUPON_ISSUE`` jobs = its user_coupons
  rows <= ``total_quantity``, at most one per user (rows and SUCCEEDED jobs);
* no job left PENDING once the load has drained.

Each check returns the violations it found as sentences (empty: it holds).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

STOCK_TAKEN = """
WITH taken AS (
    SELECT id, %(stock)s - stock AS taken FROM products WHERE id = ANY(%(ids)s)
), lines AS (
    SELECT l.product_id AS id, sum(l.quantity) AS units
    FROM order_lines l JOIN orders o ON o.id = l.order_id
    WHERE o.status <> 'FAILED' AND l.product_id = ANY(%(ids)s)
    GROUP BY l.product_id
), jobs AS (
    SELECT (line->>'productId')::bigint AS id, sum((line->>'quantity')::bigint) AS units
    FROM jobs j CROSS JOIN LATERAL jsonb_array_elements(j.payload->'orderLines') AS line
    WHERE j.kind = 'ORDER_CREATE' AND j.status = 'SUCCEEDED'
    GROUP BY 1
)
SELECT t.id, t.taken, coalesce(lines.units, 0), coalesce(jobs.units, 0)
FROM taken t LEFT JOIN lines USING (id) LEFT JOIN jobs USING (id)
WHERE t.taken <> coalesce(lines.units, 0)
   OR (%(with_jobs)s AND t.taken <> coalesce(jobs.units, 0))
ORDER BY t.id
LIMIT 10
"""

POINTS = """
WITH applied AS (
    SELECT (payload->>'userId')::bigint AS user_id,
           sum(CASE kind
                 WHEN 'POINTS_CHARGE' THEN (payload->>'amount')::bigint
                 WHEN 'POINTS_USE' THEN -(payload->>'amount')::bigint
                 ELSE -(result->>'paidAmount')::bigint
               END) AS net
    FROM jobs
    WHERE status = 'SUCCEEDED' AND kind IN ('POINTS_CHARGE', 'POINTS_USE', 'ORDER_PAY')
    GROUP BY 1
), histories AS (
    SELECT user_id,
           sum(CASE type WHEN 'CHARGE' THEN amount ELSE -amount END) AS net,
           (array_agg(balance_after ORDER BY id DESC))[1] AS last_after
    FROM point_histories GROUP BY user_id
)
SELECT coalesce(p.user_id, a.user_id, h.user_id), p.balance, a.net, h.net, h.last_after
FROM points p
FULL JOIN applied a ON a.user_id = p.user_id
FULL JOIN histories h ON h.user_id = coalesce(p.user_id, a.user_id)
WHERE (%(with_jobs)s AND p.balance IS DISTINCT FROM coalesce(a.net, 0))
   OR p.balance IS DISTINCT FROM coalesce(h.net, 0)
   OR (h.user_id IS NOT NULL AND p.balance IS DISTINCT FROM h.last_after)
LIMIT 10
"""

COUPONS = """
WITH issued AS (
    SELECT (payload->>'couponId')::bigint AS coupon_id, count(*) AS n,
           count(DISTINCT (payload->>'userId')::bigint) AS users
    FROM jobs WHERE kind = 'COUPON_ISSUE' AND status = 'SUCCEEDED' GROUP BY 1
), held AS (
    SELECT coupon_id, count(*) AS n, count(DISTINCT user_id) AS users
    FROM user_coupons GROUP BY coupon_id
)
SELECT c.id, c.issued_quantity, c.total_quantity, coalesce(i.n, 0), coalesce(i.users, 0),
       coalesce(h.n, 0), coalesce(h.users, 0)
FROM coupons c LEFT JOIN issued i ON i.coupon_id = c.id LEFT JOIN held h ON h.coupon_id = c.id
WHERE (%(with_jobs)s AND c.issued_quantity <> coalesce(i.n, 0))
   OR c.issued_quantity <> coalesce(h.n, 0)
   OR c.issued_quantity > c.total_quantity
   OR (%(with_jobs)s AND coalesce(i.n, 0) <> coalesce(i.users, 0))
   OR coalesce(h.n, 0) <> coalesce(h.users, 0)
LIMIT 10
"""

PENDING_BY_PARTITION = (
    "SELECT partition, count(*) FROM jobs WHERE status = 'PENDING' GROUP BY partition"
)

FINISHED = "SELECT count(*) FROM jobs WHERE status <> 'PENDING'"

OUTCOMES = """
SELECT kind, status, coalesce(error->>'code', ''), count(*) FROM jobs
WHERE finished_at IS NOT NULL AND seq > %(after)s
GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
"""


def connect(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True, connect_timeout=5)


def pending(url: str) -> dict[str, int]:
    with connect(url) as conn:
        return {str(p): int(n) for p, n in conn.execute(PENDING_BY_PARTITION)}


def finished_jobs(url: str) -> int:
    with connect(url) as conn:
        row = conn.execute(FINISHED).fetchone()
    return int(row[0]) if row else 0


def last_seq(url: str) -> int:
    with connect(url) as conn:
        row = conn.execute("SELECT coalesce(max(seq), 0) FROM jobs").fetchone()
    return int(row[0]) if row else 0


def outcomes_since(url: str, seq: int) -> dict[str, int]:
    """``"ORDER_CREATE SUCCEEDED"`` / ``"... FAILED INSUFFICIENT_STOCK"`` -> count."""
    with connect(url) as conn:
        rows = conn.execute(OUTCOMES, {"after": seq}).fetchall()
    return {
        " ".join(x for x in (kind, status, code) if x): int(n) for kind, status, code, n in rows
    }


def wait_drained(url: str, timeout: float) -> tuple[float, list[str]]:
    """Wait until no job is PENDING: (seconds it took, violations if it never came)."""
    started = time.monotonic()
    while True:
        left = sum(pending(url).values())
        elapsed = time.monotonic() - started
        if left == 0:
            return elapsed, []
        if elapsed > timeout:
            return elapsed, [f"{left} jobs still PENDING {timeout:.0f} s after the load"]
        time.sleep(0.2)


def check_invariants(
    url: str,
    *,
    stock: int,
    service_ids: list[int],
    other_ids: list[int],
    with_jobs: bool = True,
) -> list[str]:
    """The invariants; ``with_jobs=False`` leaves out the comparisons with the jobs table
    (the soak run, whose finished jobs are dropped past a retention of minutes)."""
    violations: list[str] = []
    with connect(url) as conn:
        for ids, compare_jobs in ((service_ids, with_jobs), (other_ids, False)):
            if not ids:
                continue
            for pid, taken, lines, jobs in conn.execute(
                STOCK_TAKEN, {"stock": stock, "ids": ids, "with_jobs": compare_jobs}
            ):
                detail = f", SUCCEEDED ORDER_CREATE units {jobs}" if compare_jobs else ""
                violations.append(
                    f"product {pid}: stock taken {taken} != order line units {lines}{detail}"
                )
        for user, balance, applied, histories, last_after in conn.execute(
            POINTS, {"with_jobs": with_jobs}
        ):
            violations.append(
                f"user {user}: balance {balance}, applied jobs {applied}, "
                f"histories {histories}, last balance_after {last_after}"
            )
        for cid, issued, total, jobs, job_users, held, held_users in conn.execute(
            COUPONS, {"with_jobs": with_jobs}
        ):
            violations.append(
                f"coupon {cid}: issued_quantity {issued} of {total}, SUCCEEDED issues {jobs} "
                f"({job_users} users), user_coupons {held} ({held_users} users)"
            )
    return violations


@dataclass
class BacklogSampler:
    """Pending jobs per partition, sampled every ``interval`` seconds in a thread."""

    url: str
    interval: float = 1.0
    samples: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="backlog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        with connect(self.url) as conn:
            while not self._stop.is_set():
                rows = conn.execute(PENDING_BY_PARTITION).fetchall()
                self.samples.append((time.monotonic() - started, {str(p): int(n) for p, n in rows}))
                self._stop.wait(self.interval)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        totals = [sum(s.values()) for _, s in self.samples]
        by_partition: dict[str, int] = {}
        for _, sample in self.samples:
            for partition, n in sample.items():
                by_partition[partition] = max(n, by_partition.get(partition, 0))
        return {
            "max_by_partition": dict(sorted(by_partition.items())),
            "max_total": max(totals, default=0),
            "max_partition": max((max(s.values(), default=0) for _, s in self.samples), default=0),
            "last_total": totals[-1] if totals else 0,
            "series": [(round(t, 2), sum(s.values())) for t, s in self.samples],
        }
