"""Open-loop load from one asyncio process (``bench/fasthttp.py``), run by ``bench/run.py``.

wrk is closed-loop: a slow answer delays the next request.  Here every request
starts on a fixed schedule whatever the answers, and latencies count from the
scheduled start, so a stalled server shows as latency and backlog instead of
a politely slower client.

    python -m bench.loadgen mixed '<json config>'
    python -m bench.loadgen longpoll '<json config>'

Each prints ``LOADGEN_JSON {...}`` as its last line; ``longpoll`` also prints
``LOADGEN_EVENT probed`` once its loaded probe is over (the harness then restarts
the partition worker, and the held polls are answered as their jobs finish).
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import uvloop

from bench.fasthttp import Disconnected, Pool

NET_ERRORS = (OSError, TimeoutError)  # ConnectionError and Disconnected are OSErrors


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


def summary_ms(values: list[float]) -> dict[str, float | None]:
    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1e3, 2)

    return {
        "n": len(values),
        "p50_ms": ms(percentile(values, 50)),
        "p99_ms": ms(percentile(values, 99)),
        "max_ms": ms(max(values, default=None)),
    }


def error_name(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):  # asyncio.TimeoutError is this one since 3.11
        return "timeout"
    if isinstance(exc, Disconnected):
        return "disconnected"
    if isinstance(exc, ConnectionRefusedError):
        return "connect refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "reset"
    return type(exc).__name__


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Client:
    """Job requests and their awaits: ``Prefer: wait`` on the POST, then long polls."""

    pool: Pool
    prefer_wait: int
    poll_wait: int
    give_up_after: float
    errors: Counter[str] = field(default_factory=Counter)
    polls: int = 0
    direct: int = 0

    timeout: float = 10.0

    async def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, headers: str = ""
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        status, raw = await self.pool.request(method, path, data, headers, self.timeout)
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            doc = None
        return status, doc

    async def submit(self, path: str, body: dict[str, Any]) -> tuple[float | None, str | None]:
        """POST a job and await it: (when it was accepted, its final status), or Nones."""
        accepted, doc = await self.submit_for_document(path, body)
        return accepted, None if doc is None else str(doc["status"])

    async def submit_for_document(
        self, path: str, body: dict[str, Any]
    ) -> tuple[float | None, dict[str, Any] | None]:
        """POST a job and await it: (when it was accepted, its finished status document)."""
        headers = f"Prefer: wait={self.prefer_wait}\r\n" if self.prefer_wait else ""
        try:
            status, doc = await self.call("POST", path, body, headers)
        except NET_ERRORS as exc:
            self.errors[f"POST {error_name(exc)}"] += 1
            return None, None
        accepted = time.monotonic()
        if status not in (200, 202) or not isinstance(doc, dict) or "jobId" not in doc:
            self.errors[f"POST http {status}"] += 1
            return None, None
        if status == 200 and doc.get("status") != "PENDING":
            self.direct += 1
            return accepted, doc
        return accepted, await self.await_document(str(doc["jobId"]))

    async def await_job(self, job_id: str) -> str | None:
        doc = await self.await_document(job_id)
        return None if doc is None else str(doc["status"])

    async def await_document(self, job_id: str) -> dict[str, Any] | None:
        deadline = time.monotonic() + self.give_up_after
        while time.monotonic() < deadline:
            self.polls += 1
            try:
                status, doc = await self.call("GET", f"/v1/jobs/{job_id}?wait={self.poll_wait}")
            except NET_ERRORS as exc:
                self.errors[f"poll {error_name(exc)}"] += 1
                await asyncio.sleep(0.05)  # a refused connection must not spin
                continue
            if status != 200 or not isinstance(doc, dict):
                self.errors[f"poll http {status}"] += 1
                return None
            if doc.get("status") != "PENDING":
                return doc
        self.errors["still PENDING when the client gave up"] += 1
        return None


async def open_loop(
    rate: float, seconds: float, start: float, launch: Any, in_flight: set[asyncio.Task[None]]
) -> tuple[int, float]:
    """Start ``launch(i, scheduled)`` at ``start + i / rate``: (arrivals, worst lag in s)."""
    total = int(rate * seconds)
    i, worst = 0, 0.0
    while i < total:
        now = time.monotonic()
        due = min(total, int((now - start) * rate) + 1)
        while i < due:
            scheduled = start + i / rate
            worst = max(worst, now - scheduled)
            task = asyncio.ensure_future(launch(i, scheduled))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            i += 1
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
    return total, worst


# ---- the mixed load ----------------------------------------------------------------


PAYERS = 500  # users who place the mixed load's orders, and pay them


async def mixed(cfg: dict[str, Any]) -> dict[str, Any]:
    """60% orders, 20% point charges, 10% coupon issues, 10% product reads, every job awaited;
    each order that succeeds is paid by its user ``pay_after`` seconds later (a payment job,
    awaited too: arrivals on top of the offered rate).  Orders are placed by ``PAYERS``
    users, each charged 1,000,000 points before the load, so payments are covered."""
    rate, seconds = float(cfg["rate"]), float(cfg["seconds"])
    products: list[int] = cfg["products"]
    coupons: list[int] = cfg["coupons"]
    users_lo, users_hi = cfg["charge_users"]
    rng = random.Random(cfg.get("seed", 1))
    mix = [("order", 60), ("charge", 20), ("issue", 10), ("read", 10)]
    kinds = [k for k, _ in mix]
    weights = [w for _, w in mix]
    max_in_flight = int(cfg.get("max_in_flight", 5000))
    pay_after: tuple[float, float] | None = cfg.get("pay_after", (0.5, 3.0))

    accept_at: list[float] = []  # seconds since start when the POST was answered
    done_at: list[float] = []
    complete_latency: list[float] = []  # scheduled start -> job finished
    accept_latency: list[float] = []
    read_latency: list[float] = []
    outcomes: Counter[str] = Counter()
    counts: Counter[str] = Counter()

    pool = Pool.for_url(cfg["base"])
    client = Client(
        pool,
        cfg["prefer_wait"],
        cfg["poll_wait"],
        cfg["give_up_after"],
        timeout=max(cfg["prefer_wait"], cfg["poll_wait"]) + 10,
    )
    in_flight: set[asyncio.Task[None]] = set()
    start = time.monotonic() + 0.2

    async def arrival(_i: int, scheduled: float) -> None:
        kind = rng.choices(kinds, weights)[0]
        counts[kind] += 1
        if len(in_flight) > max_in_flight:
            client.errors["not sent: generator in-flight cap"] += 1
            return
        if kind == "read":
            try:
                status, _ = await client.call("GET", f"/v1/products/{rng.choice(products)}")
            except NET_ERRORS as exc:
                client.errors[f"read {error_name(exc)}"] += 1
                return
            if status != 200:
                client.errors[f"read http {status}"] += 1
                return
            read_latency.append(time.monotonic() - scheduled)
            return
        if kind == "order":
            path = "/v1/orders"
            body: dict[str, Any] = {
                "userId": rng.choice(payers) if pay_after else rng.randint(1, 1_000_000),
                "orderLines": [{"productId": rng.choice(products), "quantity": 1}],
            }
        elif kind == "charge":
            path = "/v1/points/charge"
            body = {"userId": rng.randint(users_lo, users_hi), "amount": rng.randint(1, 100)}
        else:
            path = f"/v1/coupons/{rng.choice(coupons)}/issue"
            body = {"userId": rng.randint(1, 1_000_000)}
        await job(kind, path, body, scheduled)

    async def job(kind: str, path: str, body: dict[str, Any], scheduled: float) -> None:
        accepted, doc = await client.submit_for_document(path, body)
        if accepted is None:
            return
        accept_at.append(accepted - start)
        accept_latency.append(accepted - scheduled)
        if doc is None:
            return
        finished = time.monotonic()
        done_at.append(finished - start)
        complete_latency.append(finished - scheduled)
        outcomes[f"{kind} {doc['status']}"] += 1
        if kind == "order" and doc["status"] == "SUCCEEDED" and pay_after:
            task = asyncio.ensure_future(pay(int(doc["result"]["orderId"]), int(body["userId"])))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)

    async def pay(order_id: int, user_id: int) -> None:
        await asyncio.sleep(rng.uniform(*pay_after))
        counts["pay"] += 1
        await job("pay", f"/v1/orders/{order_id}/payment", {"userId": user_id}, time.monotonic())

    # The payers are charged once before the load (jobs like any other, so the invariants
    # hold), enough for every order they will pay.
    payers = list(range(users_lo, min(users_lo + PAYERS, users_hi + 1)))
    if pay_after:
        setup = asyncio.Semaphore(32)

        async def fund(user: int) -> None:
            async with setup:
                await client.submit("/v1/points/charge", {"userId": user, "amount": 1_000_000})

        await asyncio.gather(*(fund(u) for u in payers))
        start = time.monotonic() + 0.2
    print("LOADGEN_EVENT started", flush=True)
    arrivals, worst_lag = await open_loop(rate, seconds, start, arrival, in_flight)
    end_of_schedule = time.monotonic()
    print("LOADGEN_EVENT scheduled", flush=True)
    deadline = time.monotonic() + cfg["give_up_after"] + 15
    while in_flight and time.monotonic() < deadline:  # payments keep joining until the end
        await asyncio.wait(set(in_flight), timeout=deadline - time.monotonic())
    unfinished = len(in_flight)
    for task in list(in_flight):
        task.cancel()
    tail = time.monotonic() - end_of_schedule
    pool.close()

    def within(at: list[float]) -> int:
        return sum(1 for t in at if t <= seconds)

    # Completion latency per bucket of finishing time (the soak run's per-minute view).
    by_bucket: list[dict[str, Any]] = []
    bucket = cfg.get("bucket_seconds")
    if bucket:
        grouped: dict[int, list[float]] = {}
        for at, latency in zip(done_at, complete_latency, strict=True):
            grouped.setdefault(int(at // bucket), []).append(latency)
        by_bucket = [{"from_s": k * bucket, **summary_ms(grouped[k])} for k in sorted(grouped)]

    jobs_offered = counts["order"] + counts["charge"] + counts["issue"] + counts["pay"]
    return {
        "offered_per_s": arrivals / seconds,
        "arrivals": arrivals,
        "offered": dict(counts),
        "jobs_offered": jobs_offered,
        "accepted": len(accept_at),
        "accepted_per_s": within(accept_at) / seconds,
        "completed": len(done_at),
        "completed_per_s": within(done_at) / seconds,
        "completion": summary_ms(complete_latency),
        "accept": summary_ms(accept_latency),
        "read": summary_ms(read_latency),
        "outcomes": dict(outcomes),
        "errors": dict(client.errors),
        "error_count": sum(client.errors.values()) + unfinished,
        "unfinished_at_exit": unfinished,
        "direct": client.direct,
        "polls": client.polls,
        "connections_opened": pool.opened,
        "resent_on_stale_connection": pool.resent,
        "generator_worst_lag_ms": round(worst_lag * 1e3, 1),
        "tail_s": round(tail, 2),
        "completion_by_bucket": by_bucket,
    }


# ---- long polls held while reads and job POSTs are measured --------------------------


async def probe(
    client: Client, cfg: dict[str, Any], rng: random.Random
) -> dict[str, dict[str, float | None]]:
    """Product reads and order POSTs (202 expected: the worker is stopped), open loop."""
    reads: list[float] = []
    posts: list[float] = []
    in_flight: set[asyncio.Task[None]] = set()
    products: list[int] = cfg["products"]

    async def one(i: int, scheduled: float) -> None:
        try:
            if i % 2:
                status, _ = await client.call("GET", f"/v1/products/{rng.choice(products)}")
                ok, into, what = status == 200, reads, "read"
            else:
                body = {
                    "userId": rng.randint(1, 1_000_000),
                    "orderLines": [{"productId": rng.choice(products), "quantity": 1}],
                }
                status, _ = await client.call("POST", "/v1/orders", body)
                ok, into, what = status == 202, posts, "POST"
        except NET_ERRORS as exc:
            client.errors[f"probe {'read' if i % 2 else 'POST'} {error_name(exc)}"] += 1
            if isinstance(exc, TimeoutError):
                # Censored at the client's timeout: the p99 must not forget the worst.
                (reads if i % 2 else posts).append(time.monotonic() - scheduled)
            return
        if ok:
            into.append(time.monotonic() - scheduled)
        else:
            client.errors[f"probe {what} http {status}"] += 1

    await open_loop(
        2 * cfg["probe_rate"], cfg["probe_seconds"], time.monotonic() + 0.05, one, in_flight
    )
    if in_flight:
        await asyncio.wait(set(in_flight), timeout=15)
    return {"read": summary_ms(reads), "post": summary_ms(posts)}


async def settled(client: Client, max_seconds: float) -> float:
    """Seconds until the arrival burst of the held polls is over: /healthz answers within
    25 ms five times in a row (the target is about clients that are waiting, not about
    the second in which thousands of them connect)."""
    started = time.monotonic()
    quick = 0
    while quick < 5 and time.monotonic() - started < max_seconds:
        sent = time.monotonic()
        try:
            await client.call("GET", "/healthz")
        except NET_ERRORS:
            quick = 0
            continue
        quick = quick + 1 if time.monotonic() - sent < 0.025 else 0
        await asyncio.sleep(0.05)
    return round(time.monotonic() - started, 2)


async def longpoll(cfg: dict[str, Any]) -> dict[str, Any]:
    rng = random.Random(cfg.get("seed", 2))
    clients = int(cfg["clients"])
    wait = int(cfg["wait"])
    users_lo, _ = cfg["charge_users"]
    probe_pool, hold_pool = Pool.for_url(cfg["base"]), Pool.for_url(cfg["base"])
    prober = Client(probe_pool, 0, 0, 0)
    unloaded = await probe(prober, cfg, rng)

    # Jobs that stay PENDING (no partition worker runs): one point charge per client.
    job_ids: list[str] = []
    sem = asyncio.Semaphore(32)

    async def accept(i: int) -> None:
        async with sem:
            try:
                status, doc = await prober.call(
                    "POST", "/v1/points/charge", {"userId": users_lo + i, "amount": 1}
                )
            except NET_ERRORS as exc:
                prober.errors[f"setup POST {error_name(exc)}"] += 1
                return
            if status == 202 and isinstance(doc, dict):
                job_ids.append(str(doc["jobId"]))
            else:
                prober.errors[f"setup POST http {status}"] += 1

    await asyncio.gather(*(accept(i) for i in range(clients)))

    answered: list[tuple[float, str]] = []
    holder = Client(hold_pool, 0, wait, 0, timeout=wait + 30)

    async def hold(job_id: str) -> None:
        try:
            status, doc = await holder.call("GET", f"/v1/jobs/{job_id}?wait={wait}")
        except NET_ERRORS as exc:
            holder.errors[f"held poll {error_name(exc)}"] += 1
            return
        state = doc.get("status") if isinstance(doc, dict) else f"http {status}"
        answered.append((time.monotonic(), str(state)))

    held_at = time.monotonic()
    polls = [asyncio.ensure_future(hold(j)) for j in job_ids]
    await asyncio.sleep(cfg.get("settle_seconds", 2.0))
    settled_after = await settled(prober, cfg.get("settle_max_seconds", 20.0))
    early = len(answered)
    loaded = await probe(prober, cfg, rng)
    still_held = len(job_ids) - len(answered)
    print("LOADGEN_EVENT probed", flush=True)
    released_at = time.monotonic()
    await asyncio.wait(polls, timeout=wait + 35)
    woken = [t - released_at for t, state in answered if state in ("SUCCEEDED", "FAILED")]
    probe_pool.close()
    hold_pool.close()

    def delta(key: str) -> float | None:
        a, b = loaded[key]["p99_ms"], unloaded[key]["p99_ms"]
        return None if a is None or b is None else round(a - b, 2)

    return {
        "clients": clients,
        "jobs_held": len(job_ids),
        "answered_before_probe": early,
        "burst_settled_after_s": settled_after,
        "held_during_probe": still_held,
        "unloaded": unloaded,
        "loaded": loaded,
        "read_p99_delta_ms": delta("read"),
        "post_p99_delta_ms": delta("post"),
        "woken_after_restart": summary_ms(woken),
        "answered_pending": sum(1 for _, s in answered if s == "PENDING"),
        "held_seconds": round(released_at - held_at, 2),
        "errors": dict(prober.errors + holder.errors),
        "error_count": sum(prober.errors.values()) + sum(holder.errors.values()),
    }


def main(argv: list[str]) -> int:
    mode, cfg = argv[0], json.loads(argv[1])
    raise_fd_limit()
    run = {"mixed": mixed, "longpoll": longpoll}[mode]
    # uvloop: about half the CPU per request of asyncio's own loop, on the cores the
    # service under measurement uses too.
    result = uvloop.run(run(cfg))
    print("LOADGEN_JSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
