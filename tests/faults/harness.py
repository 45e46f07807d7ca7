"""Fault-test harness: private servers, a bounded job load, an exact invariant check.

Every fault test runs on its own PostgreSQL and Redis (free ports, data under the
test's ``tmp_path``) and its own ``Stack`` of real processes; nothing here
touches the machine's shared servers or another test's.

* ``private_rig(tmp_path)`` starts PostgreSQL (migrated), Redis and the Stack.
* ``open_shop(rig)`` creates a few products with known stock and one coupon;
  ``open_orders(rig, load, n)`` places orders (through the load) for payments to pay.
* ``Load`` sends job POSTs (points charges/uses on a few users, orders on the
  products, issues of the coupon, payments of the open orders), each with its own
  ``Idempotency-Key`` so that
  any committed job row maps back to the request that wrote it, and records
  every answer in a ``Ledger``; ``Load.stream`` runs it in the background at a
  bounded rate so a fault can be injected mid-stream.
* ``wait_settled`` polls the database until no job is PENDING and the outbox is
  delivered (with a deadline); ``check`` verifies, in SQL, that every 202 was
  applied exactly once and that every balance, stock, coupon count and order
  history, payment and best-seller count is exactly what the succeeded jobs add up to.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import psycopg
import requests
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from shared.config import REDIS_DB_BROKER, redis_url_for
from shared.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedStandby, migrate
from tests.faults.proxy import CommitCutter
from tests.stack import Stack

ADMIN_TOKEN = "fault-test-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

# The only ways a job may end FAILED in these loads (INTERNAL would mean a fault
# was counted as an attempt at the job, which API.md forbids).
BUSINESS_FAILURES: dict[str, set[str]] = {
    "POINTS_CHARGE": {"POINT_LIMIT_EXCEEDED"},
    "POINTS_USE": {"INSUFFICIENT_POINTS"},
    "ORDER_CREATE": {"INSUFFICIENT_STOCK", "PRODUCT_NOT_FOUND"},
    "COUPON_ISSUE": {"COUPON_SOLD_OUT", "COUPON_ALREADY_ISSUED"},
    "ORDER_PAY": {"ORDER_NOT_PAYABLE", "ORDER_NOT_OWNED", "INSUFFICIENT_POINTS"},
}

POINTS_ONLY = {"points": 1.0}
ORDERS_ONLY = {"orders": 1.0}
DEFAULT_MIX = {"points": 0.35, "orders": 0.40, "coupons": 0.25}
PAYMENTS_MIX = {"payments": 0.6, "points": 0.4}  # needs open_orders() first


# ---- private servers ---------------------------------------------------------


@dataclass
class Rig:
    root: Path
    pg: EmbeddedPostgres
    redis: EmbeddedRedis
    stack: Stack
    cutter: CommitCutter | None = None  # web and workers reach PostgreSQL through it
    standbys: list[EmbeddedStandby] = field(default_factory=list)  # DATABASE_REPLICA_URLS

    @property
    def base_url(self) -> str:
        return self.stack.base_url

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.pg.url, autocommit=True, connect_timeout=5) as conn:
            return conn.execute(sql, params).fetchall()

    def broker(self) -> Redis:
        return Redis.from_url(redis_url_for(self.redis.url, REDIS_DB_BROKER), socket_timeout=2)

    def queued_messages(self) -> dict[str, int]:
        """Messages waiting in each partition queue (a queue's backlog is a Redis list)."""
        client = self.broker()
        try:
            keys = cast(list[bytes], client.keys("*.*"))
            names = [k.decode() for k in keys if client.type(k) == b"list"]
            return {name: cast(int, client.llen(name)) for name in sorted(names)}
        finally:
            client.close()

    def unacked_partition_messages(self, client: Redis | None = None) -> int:
        """Partition wake-ups taken by a consumer and not yet acknowledged (acks_late)."""
        own = client is None
        client = client or self.broker()
        try:
            held = 0
            for raw in cast(list[bytes], client.hvals("unacked")):
                with contextlib.suppress(ValueError, IndexError, TypeError):
                    routing_key = json.loads(raw)[2]
                    held += routing_key not in ("history", "maintenance")
            return held
        finally:
            if own:
                client.close()

    def log_excerpt(self, lines: int = 25) -> str:
        """The tail of every process log and the error lines, for a failing test's output."""
        out: list[str] = []
        paths = [
            *sorted((self.root / "logs").glob("*.log")),
            self.pg.log_path,
            *(s.log_path for s in self.standbys),
        ]
        for path in paths:
            if not path.exists():
                continue
            text = path.read_text(errors="replace").splitlines()
            errors = [t for t in text if "ERROR" in t or "Traceback" in t or "CRITICAL" in t]
            out.append(f"--- {path.name}: {len(errors)} error lines, last {lines} lines")
            out.extend(text[-lines:])
        return "\n".join(out)


@contextlib.contextmanager
def private_rig(
    tmp_path: Path,
    extra_env: dict[str, str] | None = None,
    *,
    cut_commits: bool = False,
    replicas: int = 0,
    processes: tuple[str, ...] = ("web", "worker", "history", "beat"),
    extra_address: str | None = None,
    extra_clients: str | None = None,
) -> Iterator[Rig]:
    """PostgreSQL + Redis of this test only, migrated, and the Stack on them; stops all.

    With ``cut_commits`` the stack reaches PostgreSQL through a ``CommitCutter``; with
    ``replicas`` that many streaming standbys of the primary serve its lagging reads.
    With ``extra_address`` both servers listen there too (a test's veth), PostgreSQL
    trusting the clients of ``extra_clients`` (CIDR).
    """
    pg = EmbeddedPostgres(
        tmp_path / "pg" / "data", extra_address=extra_address, extra_clients=extra_clients
    )
    rd = EmbeddedRedis(tmp_path / "redis", extra_address=extra_address)
    standbys = [
        EmbeddedStandby(pg, tmp_path / "pg" / f"replica{i}", log_name=f"replica{i}.log")
        for i in range(replicas)
    ]
    stack: Stack | None = None
    cutter: CommitCutter | None = None
    try:
        pg.start()
        migrate(pg.url)
        for standby in standbys:
            standby.start()
        rd.start()
        cutter = CommitCutter(pg.port) if cut_commits else None
        env = dict(extra_env or {})
        if standbys:
            env["DATABASE_REPLICA_URLS"] = ",".join(s.url for s in standbys)
        stack = Stack(
            cutter.url(pg.url) if cutter else pg.url,
            rd.url,
            tmp_path / "logs",
            admin_token=ADMIN_TOKEN,
            extra_env=env,
        )
        for name in processes:
            stack.start(name)
        yield Rig(tmp_path, pg, rd, stack, cutter, standbys)
    finally:
        if stack is not None:
            stack.stop()
        if cutter is not None:
            cutter.close()
        rd.stop()
        for standby in standbys:
            standby.stop()
        pg.stop()


# ---- the shop under load -------------------------------------------------------


@dataclass
class Shop:
    products: dict[int, int]  # id -> initial stock
    missing_product: int  # an id no product has (PRODUCT_NOT_FOUND)
    coupon_id: int
    coupon_total: int
    users: list[int]  # points and order users
    coupon_users: list[int]
    # Orders placed by open_orders(), (order id, owner), for payments to pay.
    payable: list[tuple[int, int]] = field(default_factory=list)


def open_shop(
    rig: Rig,
    *,
    stocks: tuple[int, ...] = (60, 40, 400),
    coupon_total: int = 25,
    coupon_users: int = 40,
) -> Shop:
    http = requests.Session()
    products: dict[int, int] = {}
    for n, stock in enumerate(stocks):
        answer = http.post(
            f"{rig.base_url}/v1/products",
            json={"name": f"fault product {n}", "price": 100 * (n + 1), "stock": stock},
            headers=ADMIN,
            timeout=30,
        )
        assert answer.status_code == 201, answer.text
        products[answer.json()["id"]] = stock
    answer = http.post(
        f"{rig.base_url}/v1/coupons",
        json={"name": "fault coupon", "discountAmount": 500, "totalQuantity": coupon_total},
        headers=ADMIN,
        timeout=30,
    )
    assert answer.status_code == 201, answer.text
    http.close()
    return Shop(
        products=products,
        missing_product=max(products) + 1_000_000,
        coupon_id=answer.json()["id"],
        coupon_total=coupon_total,
        users=[101, 102, 103, 104],
        coupon_users=list(range(1001, 1001 + coupon_users)),
    )


@dataclass(frozen=True)
class JobRequest:
    kind: str
    path: str
    body: dict[str, Any]
    key: str  # Idempotency-Key: any committed job row names the request that wrote it


@dataclass
class Answer:
    request: JobRequest
    status: int  # 0: no HTTP answer (connection error or client timeout)
    job_id: str | None
    code: str | None
    retry_after: str | None
    json_body: bool
    sent_at: float  # time.monotonic() when sent
    seconds: float  # latency


class Ledger:
    """Every job POST of a test and its answer (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.answers: list[Answer] = []

    def add(self, answer: Answer) -> None:
        with self._lock:
            self.answers.append(answer)

    def snapshot(self) -> list[Answer]:
        with self._lock:
            return list(self.answers)

    def accepted(self) -> dict[str, Answer]:
        # 200: a ``Prefer: wait`` answered with the finished job's document.
        return {a.job_id: a for a in self.snapshot() if a.status in (200, 202) and a.job_id}

    def statuses(self) -> Counter[int]:
        return Counter(a.status for a in self.snapshot())


def make_requests(
    shop: Shop, n: int, rng: random.Random, mix: dict[str, float] | None = None
) -> list[JobRequest]:
    mix = mix or DEFAULT_MIX
    families, weights = list(mix), list(mix.values())
    made: list[JobRequest] = []
    for _ in range(n):
        family = rng.choices(families, weights)[0]
        key = f"fault-{uuid.uuid4().hex}"
        if family == "points":
            user = rng.choice(shop.users)
            if rng.random() < 0.6:
                made.append(
                    JobRequest(
                        "POINTS_CHARGE",
                        "/v1/points/charge",
                        {"userId": user, "amount": rng.randint(1, 500)},
                        key,
                    )
                )
            else:
                made.append(
                    JobRequest(
                        "POINTS_USE",
                        "/v1/points/use",
                        {"userId": user, "amount": rng.randint(1, 400)},
                        key,
                    )
                )
        elif family == "payments":
            order_id, owner = rng.choice(shop.payable)  # with repeats: paid twice is refused
            payer = owner if rng.random() < 0.9 else rng.choice(shop.users)
            made.append(
                JobRequest("ORDER_PAY", f"/v1/orders/{order_id}/payment", {"userId": payer}, key)
            )
        elif family == "orders":
            count = 1 if rng.random() < 0.7 else 2
            ids = rng.sample(sorted(shop.products), count)
            if rng.random() < 0.03:
                ids = [shop.missing_product]
            lines = [{"productId": p, "quantity": rng.randint(1, 3)} for p in ids]
            made.append(
                JobRequest(
                    "ORDER_CREATE",
                    "/v1/orders",
                    {"userId": rng.choice(shop.users), "orderLines": lines},
                    key,
                )
            )
        else:
            made.append(
                JobRequest(
                    "COUPON_ISSUE",
                    f"/v1/coupons/{shop.coupon_id}/issue",
                    {"userId": rng.choice(shop.coupon_users)},
                    key,
                )
            )
    return made


class Load:
    """A bounded generator of job POSTs; every answer goes to the ledger."""

    def __init__(self, rig: Rig, shop: Shop, ledger: Ledger, seed: int) -> None:
        self.rig = rig
        self.shop = shop
        self.ledger = ledger
        self.rng = random.Random(seed)
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def _http(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    def requests(self, n: int, mix: dict[str, float] | None = None) -> list[JobRequest]:
        with self._lock:
            return make_requests(self.shop, n, self.rng, mix)

    def send(
        self, request: JobRequest, timeout: float = 30, headers: dict[str, str] | None = None
    ) -> Answer:
        started = time.monotonic()
        try:
            response = self._http().post(
                self.rig.base_url + request.path,
                json=request.body,
                headers={"Idempotency-Key": request.key, **(headers or {})},
                timeout=timeout,
            )
        except requests.RequestException:
            answer = Answer(request, 0, None, None, None, False, started, 0.0)
            answer.seconds = time.monotonic() - started
            self.ledger.add(answer)
            return answer
        seconds = time.monotonic() - started
        body: Any = None
        with contextlib.suppress(ValueError):
            body = response.json()
        job_id = code = None
        if isinstance(body, dict):
            job_id = body.get("jobId") if response.status_code in (200, 202) else None
            error = body.get("error")
            code = error.get("code") if isinstance(error, dict) else None
        answer = Answer(
            request,
            response.status_code,
            job_id,
            code,
            response.headers.get("Retry-After"),
            isinstance(body, dict)
            and response.headers.get("Content-Type", "").startswith("application/json"),
            started,
            seconds,
        )
        self.ledger.add(answer)
        return answer

    def run(
        self,
        n: int,
        *,
        threads: int = 6,
        rate: float | None = None,
        mix: dict[str, float] | None = None,
        on_answer: Callable[[Answer], None] | None = None,
    ) -> list[Answer]:
        """Send ``n`` job POSTs on ``threads`` threads, at most ``rate`` per second."""
        todo = self.requests(n, mix)
        answers: list[Answer | None] = [None] * n
        lock = threading.Lock()
        next_index = [0]
        t0 = time.monotonic()

        def sender() -> None:
            while True:
                with lock:
                    i = next_index[0]
                    next_index[0] += 1
                if i >= n:
                    return
                if rate:
                    delay = t0 + i / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)  # pacing: request i leaves at t0 + i/rate
                answers[i] = self.send(todo[i])
                if on_answer is not None:
                    on_answer(answers[i])  # type: ignore[arg-type]

        pool = [threading.Thread(target=sender, daemon=True) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join(timeout=max(120.0, n / (rate or 50) * 4))
        assert not any(t.is_alive() for t in pool), "load generator threads did not finish"
        return [a for a in answers if a is not None]

    def stream(self, n: int, *, rate: float, threads: int = 6, **kw: Any) -> Stream:
        return Stream(self, n, rate=rate, threads=threads, **kw)


class Stream:
    """``Load.run`` in a background thread, so a fault can be injected while it runs."""

    def __init__(self, load: Load, n: int, **kw: Any) -> None:
        self.n = n
        self.sent = 0
        self.accepted = 0
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, args=(load, n, kw), daemon=True)
        self._thread.start()

    def _count(self, answer: Answer) -> None:
        with self._lock:
            self.sent += 1
            self.accepted += answer.status == 202

    def _run(self, load: Load, n: int, kw: dict[str, Any]) -> None:
        try:
            load.run(n, on_answer=self._count, **kw)
        except BaseException as exc:
            self.error = exc

    def wait_sent(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self.sent >= count:
                    return
            if not self._thread.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"stream sent {self.sent} of the {count} awaited (error {self.error})")

    def join(self, timeout: float = 180) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "stream did not finish"
        if self.error is not None:
            raise self.error


# ---- waiting and checking ------------------------------------------------------


def wait_settled(rig: Rig, timeout: float = 120) -> float | None:
    """Poll until no job is PENDING and every outbox row is delivered; ``None`` past the deadline.

    Returns the ``time.monotonic()`` at which that was first seen.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(psycopg.Error):
            pending, undelivered = rig.query(
                "SELECT (SELECT count(*) FROM jobs WHERE status = 'PENDING'),"
                " (SELECT count(*) FROM outbox WHERE delivered_at IS NULL)"
            )[0]
            if pending == 0 and undelivered == 0:
                return time.monotonic()
        time.sleep(0.25)
    return None


def warm_up(rig: Rig, load: Load, n: int = 12, timeout: float = 90) -> None:
    """A few jobs through every process, so a fault hits a running system, not a booting one.

    Fails at once, with the process's log, if a process of the stack has exited.
    """
    answers = load.run(n, threads=3)
    assert all(a.status == 202 for a in answers), [(a.status, a.code) for a in answers]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = {name: p.returncode for name, p in rig.stack.procs.items() if p.poll() is not None}
        if dead:
            raise AssertionError(f"stack processes exited: {dead}\n{rig.log_excerpt()}")
        if wait_settled(rig, 2) is not None:
            return
    raise AssertionError(f"the stack did not apply the warm-up jobs\n{rig.log_excerpt()}")


def open_orders(rig: Rig, load: Load, n: int, *, fund: int = 0, timeout: float = 120) -> None:
    """Place ``n`` orders through the load (so the checker knows them), optionally charge
    each user ``fund`` points first, wait for all of it, and list the orders as payable."""
    if fund:
        for user in load.shop.users:
            charge = JobRequest(
                "POINTS_CHARGE",
                "/v1/points/charge",
                {"userId": user, "amount": fund},
                f"fault-fund-{uuid.uuid4().hex}",
            )
            assert load.send(charge).status == 202
    answers = load.run(n, threads=4, mix=ORDERS_ONLY)
    assert all(a.status == 202 for a in answers), Counter(a.status for a in answers)
    if wait_settled(rig, timeout) is None:
        raise AssertionError(f"the orders were not applied\n{rig.log_excerpt()}")
    rows = rig.query(
        "SELECT o.id, o.user_id FROM orders o JOIN jobs j ON j.id = o.job_id"
        " WHERE j.id = ANY(%s::uuid[])",
        ([a.job_id for a in answers],),
    )
    load.shop.payable.extend(sorted((row[0], row[1]) for row in rows))
    assert load.shop.payable, "no order could be placed"


def kill_worker_while_draining(rig: Rig, timeout: float) -> int:
    """SIGKILL the partition worker, as soon as it holds a wake-up if one is seen within
    ``timeout``; returns how many wake-ups it held (acks_late: they stay unacked)."""
    broker = rig.broker()
    try:
        deadline = time.monotonic() + timeout
        while rig.unacked_partition_messages(broker) == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        rig.stack.kill("worker")  # SIGKILL
        return rig.unacked_partition_messages(broker)
    finally:
        broker.close()


def post_until(load: Load, status: int, *, timeout: float = 30, pause: float = 0.1) -> list[Answer]:
    """Send job POSTs one at a time (``pause`` apart) until one answers ``status``.

    Returns every answer of the probe (all recorded in the ledger too); fails past ``timeout``.
    """
    started = time.monotonic()
    answers: list[Answer] = []
    while time.monotonic() - started < timeout:
        answer = load.send(load.requests(1)[0])
        answers.append(answer)
        if answer.status == status:
            return answers
        time.sleep(pause)  # a probe, not a load: one request at a time
    raise AssertionError(f"no {status} within {timeout}s: {Counter(a.status for a in answers)}")


def probe_reads(rig: Rig, shop: Shop, job_id: str) -> dict[str, tuple[int, str | None]]:
    """A few reads during a fault: (status, error code) of each; none may be a 500."""
    paths = {
        "job": f"/v1/jobs/{job_id}",
        "job_wait": f"/v1/jobs/{job_id}?wait=1",
        "balance": f"/v1/points/{shop.users[0]}",
        "product": f"/v1/products/{min(shop.products)}",
        "coupon": f"/v1/coupons/{shop.coupon_id}",
        "readyz": "/readyz",
    }
    seen: dict[str, tuple[int, str | None]] = {}
    with requests.Session() as http:
        for name, path in paths.items():
            try:
                response = http.get(rig.base_url + path, timeout=15)
            except requests.RequestException as exc:
                seen[name] = (0, type(exc).__name__)
                continue
            code = None
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                code = response.json().get("error", {}).get("code")
            seen[name] = (response.status_code, code)
    return seen


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``predicate`` until true; returns the seconds it took (fails past ``timeout``)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout}s")


@dataclass
class Report:
    name: str
    sent: int = 0
    accepted: int = 0
    unavailable: int = 0
    no_answer: int = 0
    other: Counter[int] = field(default_factory=Counter)
    succeeded: int = 0
    failed: int = 0
    lost: int = 0
    doubled: int = 0
    refused_but_committed: int = 0  # answered 503 (or other) while the row was committed
    recovery_seconds: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def line(self) -> str:
        recovery = "n/a" if self.recovery_seconds is None else f"{self.recovery_seconds:.1f}s"
        other = ",".join(f"{k}x{v}" for k, v in sorted(self.other.items())) or "0"
        notes = " ".join(f"{k}={v}" for k, v in self.notes.items())
        return (
            f"FAULT-REPORT {self.name}: sent={self.sent} 202={self.accepted} "
            f"503={self.unavailable} no-answer={self.no_answer} other={other} "
            f"succeeded={self.succeeded} failed={self.failed} lost={self.lost} "
            f"doubled={self.doubled} 503-but-committed={self.refused_but_committed} "
            f"recovery={recovery} problems={len(self.problems)} {notes}"
        ).rstrip()

    def print(self) -> None:
        print("\n" + self.line(), flush=True)
        for text in self.problems[:40]:
            print("  PROBLEM:", text, flush=True)
        if len(self.problems) > 40:
            print(f"  ... {len(self.problems) - 40} more", flush=True)


JobRow = tuple[str, str, Any, Any, str | None]  # kind, status, result, error, idempotency key


class Checker:
    """Every invariant, exactly, in SQL (call after ``wait_settled``).

    Lost: a 202 without a row, a job still PENDING, a succeeded job without its
    effect (point history, order, order history, user coupon).  Doubled: an effect
    row more than once, or of a job that did not succeed.  Every aggregate
    (balances, stock, coupon counts, history chains) must equal what the
    succeeded jobs add up to.
    """

    def __init__(self, rig: Rig, shop: Shop, ledger: Ledger, report: Report) -> None:
        self.rig = rig
        self.shop = shop
        self.report = report
        self.answers = ledger.snapshot()
        self.by_key = {a.request.key: a for a in self.answers}
        self.accepted = ledger.accepted()
        self.jobs: dict[str, JobRow] = {
            row[0]: (row[1], row[2], row[3], row[4], row[5])
            for row in rig.query(
                "SELECT id::text, kind, status, result, error, idempotency_key FROM jobs"
            )
        }
        # Every row is held to the same rules (applied at most once, fully), also a row
        # committed for a request that got no answer, or (a bug) one answered 503.
        self.request_of: dict[str, JobRequest] = {j: a.request for j, a in self.accepted.items()}
        for job_id in self.jobs:
            origin = self.origin(job_id)
            if job_id not in self.accepted and origin is not None:
                self.request_of[job_id] = origin.request
        self.succeeded = {j for j in self.request_of if self.status(j) == "SUCCEEDED"}
        self.failed = {j for j in self.request_of if self.status(j) == "FAILED"}

    def status(self, job_id: str) -> str | None:
        row = self.jobs.get(job_id)
        return None if row is None else row[1]

    def result(self, job_id: str) -> dict[str, Any]:
        row = self.jobs.get(job_id)
        return (row[2] if row else None) or {}

    def error_code(self, job_id: str) -> str | None:
        row = self.jobs.get(job_id)
        return ((row[3] if row else None) or {}).get("code")

    def origin(self, job_id: str) -> Answer | None:
        """The request whose Idempotency-Key wrote this row."""
        scope = self.jobs[job_id][4] or ""
        return self.by_key.get(scope.rsplit(" ", 1)[-1])

    def ok(self, kind: str) -> list[tuple[str, JobRequest]]:
        return [
            (j, self.request_of[j])
            for j in sorted(self.succeeded)
            if self.request_of[j].kind == kind
        ]

    def run(self, allowed_statuses: frozenset[int], *, no_answer_ok: bool = False) -> Report:
        self.check_answers(allowed_statuses, no_answer_ok=no_answer_ok)
        self.check_jobs()
        self.check_points()
        self.check_orders()
        self.check_payments()
        self.check_order_histories()
        self.check_coupons()
        self.check_reads()
        return self.report

    def check_answers(self, allowed_statuses: frozenset[int], *, no_answer_ok: bool) -> None:
        report = self.report
        report.sent = len(self.answers)
        report.accepted = len(self.accepted)
        for a in self.answers:
            if a.status == 503:
                report.unavailable += 1
                if a.code != "UNAVAILABLE" or not a.retry_after or not a.json_body:
                    report.problem(
                        f"503 without UNAVAILABLE/Retry-After/JSON: code={a.code} "
                        f"retry-after={a.retry_after} json={a.json_body}"
                    )
            elif a.status == 0:
                report.no_answer += 1
            elif a.status != 202:
                report.other[a.status] += 1
            if a.status not in allowed_statuses and a.status != 0:
                report.problem(f"{a.request.kind} answered {a.status} {a.code}")
            if a.status == 202 and not a.job_id:
                report.problem("202 without a jobId")
        if report.no_answer and not no_answer_ok:
            report.problem(f"{report.no_answer} job POSTs got no HTTP answer")

    def check_jobs(self) -> None:
        """Every 202 has a finished row; no row was written for a request answered otherwise."""
        report = self.report
        missing = [j for j in self.accepted if j not in self.jobs]
        pending = [j for j in self.accepted if self.status(j) == "PENDING"]
        report.lost += len(missing) + len(pending)
        if missing:
            report.problem(f"{len(missing)} jobs answered 202 have no row (e.g. {missing[0]})")
        if pending:
            report.problem(f"{len(pending)} jobs answered 202 still PENDING (e.g. {pending[0]})")
        for job_id, (kind, status, *_rest) in self.jobs.items():
            origin = self.origin(job_id)
            if origin is None:
                report.problem(f"job row {job_id} ({kind} {status}) matches no request")
            elif job_id in self.accepted and origin.job_id != job_id:
                report.problem(f"job {job_id} carries the key of job {origin.job_id}")
            elif origin.request.kind != kind:
                report.problem(f"job {job_id} is {kind}, sent as {origin.request.kind}")
            elif job_id not in self.accepted and origin.status != 0:
                report.refused_but_committed += 1
                report.problem(
                    f"job row {job_id} ({kind} {status}) committed for a request answered "
                    f"{origin.status} {origin.code}"
                )
        report.succeeded = len(self.succeeded & set(self.accepted))
        report.failed = len(self.failed & set(self.accepted))
        codes: Counter[str | None] = Counter()
        for j in self.failed:
            kind, code = self.jobs[j][0], self.error_code(j)
            codes[code] += 1
            if code not in BUSINESS_FAILURES.get(kind, set()):
                report.problem(f"job {j} ({kind}) FAILED with {code}: {self.jobs[j][3]}")
        report.notes["failures"] = dict(codes)

    def effects(self, what: str, per_job: Counter[str], wanted: set[str]) -> None:
        """One effect row per succeeded job of a kind, none for any other job."""
        report = self.report
        report.doubled += sum(c - 1 for c in per_job.values() if c > 1)
        if any(c > 1 for c in per_job.values()):
            report.problem(f"a job has more than one {what}")
        stray = [j for j in per_job if j not in wanted]
        report.doubled += len(stray)
        if stray:
            report.problem(f"{len(stray)} {what} rows of jobs not SUCCEEDED (e.g. {stray[0]})")
        missing = wanted - set(per_job)
        report.lost += len(missing)
        if missing:
            report.problem(f"{len(missing)} succeeded jobs without their {what}")

    def check_points(self) -> None:
        report = self.report
        charges, uses = self.ok("POINTS_CHARGE"), self.ok("POINTS_USE")
        payments = self.ok("ORDER_PAY")
        expected: defaultdict[int, int] = defaultdict(int)
        for _, req in charges:
            expected[req.body["userId"]] += req.body["amount"]
        for _, req in uses:
            expected[req.body["userId"]] -= req.body["amount"]
        for j, req in payments:
            expected[req.body["userId"]] -= self.result(j).get("paidAmount", 0)
        balances: dict[int, int] = {
            row[0]: row[1] for row in self.rig.query("SELECT user_id, balance FROM points")
        }
        for user in sorted(set(expected) | set(balances)):
            if balances.get(user, 0) != expected[user]:
                report.problem(
                    f"user {user} balance {balances.get(user, 0)} != succeeded charges - uses "
                    f"{expected[user]}"
                )
        histories = self.rig.query(
            "SELECT user_id, type, amount, balance_after, job_id::text"
            " FROM point_histories ORDER BY id"
        )
        self.effects(
            "point history",
            Counter(row[4] for row in histories),
            {j for j, _ in charges + uses + payments},
        )
        running: defaultdict[int, int] = defaultdict(int)
        for user, kind, amount, after, job_id in histories:
            running[user] += amount if kind == "CHARGE" else -amount
            if running[user] != after:
                report.problem(f"user {user} history chain breaks at job {job_id}: {after}")
                running[user] = after
            result = self.result(job_id)
            if job_id in self.succeeded and result.get("amount", result.get("balance")) != after:
                report.problem(f"job {job_id} result {self.result(job_id)} != balance {after}")

    def check_orders(self) -> None:
        report = self.report
        orders = self.ok("ORDER_CREATE")
        rows = self.rig.query("SELECT id, job_id::text FROM orders")
        self.effects("order", Counter(row[1] for row in rows), {j for j, _ in orders})
        order_of_job = {row[1]: row[0] for row in rows}
        lines: defaultdict[int, dict[int, int]] = defaultdict(dict)
        for order_id, product_id, quantity in self.rig.query(
            "SELECT order_id, product_id, quantity FROM order_lines"
        ):
            lines[order_id][product_id] = quantity
        taken: Counter[int] = Counter()
        for j, req in orders:
            wanted = {line["productId"]: line["quantity"] for line in req.body["orderLines"]}
            taken.update(wanted)
            order_id = order_of_job.get(j)
            if order_id is None:
                continue
            if lines.get(order_id) != wanted:
                report.problem(f"order {order_id} lines {lines.get(order_id)} != {wanted}")
            if self.result(j).get("orderId") != order_id:
                report.problem(f"job {j} result {self.result(j)} is not order {order_id}")
        stocks: dict[int, int] = {
            row[0]: row[1] for row in self.rig.query("SELECT id, stock FROM products")
        }
        sold: dict[int, int] = {
            row[0]: int(row[1])
            for row in self.rig.query(
                "SELECT product_id, sum(units) FROM product_sales GROUP BY product_id"
            )
        }
        for product_id, initial in self.shop.products.items():
            if stocks.get(product_id) != initial - taken[product_id]:
                report.problem(
                    f"product {product_id} stock {stocks.get(product_id)} != {initial} - "
                    f"{taken[product_id]} taken by succeeded orders"
                )
            # No order fails in these loads: the best-seller aggregate counts every unit.
            if sold.get(product_id, 0) != taken[product_id]:
                report.problem(
                    f"product {product_id} best-seller units {sold.get(product_id, 0)} != "
                    f"{taken[product_id]} taken by succeeded orders"
                )

    def check_payments(self) -> None:
        """Each order is paid by at most one succeeded ORDER_PAY, and exactly the orders so
        paid are COMPLETED, with that payment (no coupons in these loads) and one debit."""
        report = self.report
        paid_by: defaultdict[int, list[str]] = defaultdict(list)
        for j, _ in self.ok("ORDER_PAY"):
            paid_by[int(self.result(j).get("orderId", 0))].append(j)
        report.doubled += sum(len(js) - 1 for js in paid_by.values() if len(js) > 1)
        orders = self.rig.query(
            "SELECT o.id, o.status, o.total_price, o.paid_amount, o.discount_amount,"
            " (SELECT array_agg(h.job_id::text) FROM point_histories h WHERE h.order_id = o.id)"
            " FROM orders o"
        )
        for order_id, status, total, paid, discount, debits in orders:
            jobs = paid_by.pop(order_id, [])
            if len(jobs) > 1:
                report.problem(f"order {order_id} paid by {len(jobs)} jobs")
            if not jobs:
                if status != "READY" or debits:
                    report.problem(f"order {order_id} {status} debited {debits} without a payment")
                continue
            result = self.result(jobs[0])
            if (status, paid, discount) != ("COMPLETED", total, 0) or result.get(
                "paidAmount"
            ) != total:
                report.problem(
                    f"order {order_id} {status} paid {paid}/{discount} of {total}, job {result}"
                )
            if debits != jobs[:1]:
                report.problem(f"order {order_id} debits {debits} != its payment {jobs[0]}")
        if paid_by:
            report.lost += len(paid_by)
            report.problem(f"payments of orders that do not exist: {sorted(paid_by)}")

    def check_order_histories(self) -> None:
        """Exactly one history row per state entered: READY, then COMPLETED once paid
        (no other status change is requested here)."""
        report = self.report
        completed = {
            row[0] for row in self.rig.query("SELECT id FROM orders WHERE status = 'COMPLETED'")
        }
        order_ids = {row[0] for row in self.rig.query("SELECT id FROM orders")}
        histories = self.rig.query("SELECT order_id, status FROM order_histories")
        wanted = {(o, "READY") for o in order_ids} | {(o, "COMPLETED") for o in completed}
        got = Counter((row[0], row[1]) for row in histories)
        report.doubled += sum(c - 1 for c in got.values() if c > 1)
        stray = set(got) - wanted
        missing = wanted - set(got)
        report.doubled += len(stray)
        report.lost += len(missing)
        if stray or missing or any(c > 1 for c in got.values()):
            report.problem(
                f"order histories: {len(missing)} missing, {len(stray)} stray,"
                f" {sum(c > 1 for c in got.values())} doubled"
            )
        outbox = self.rig.query(
            "SELECT count(*), count(*) FILTER (WHERE delivered_at IS NULL),"
            " count(DISTINCT order_id) FROM outbox"
        )[0]
        if outbox != (len(wanted), 0, len(order_ids)):
            report.problem(
                f"outbox (rows, undelivered, orders) {outbox} for {len(order_ids)} orders,"
                f" {len(completed)} paid"
            )

    def check_coupons(self) -> None:
        report = self.report
        issues = self.ok("COUPON_ISSUE")
        rows = self.rig.query(
            "SELECT id, user_id FROM user_coupons WHERE coupon_id = %s", (self.shop.coupon_id,)
        )
        holder_of = {row[0]: row[1] for row in rows}
        per_job = Counter(
            j
            for j, req in issues
            if holder_of.get(self.result(j).get("userCouponId")) == req.body["userId"]
        )
        self.effects("user coupon", per_job, {j for j, _ in issues})
        per_user = Counter(row[1] for row in rows)
        report.doubled += sum(c - 1 for c in per_user.values() if c > 1)
        wanted_users = {req.body["userId"] for _, req in issues}
        if set(per_user) != wanted_users or len(issues) != len(wanted_users):
            report.problem(
                f"coupon holders {sorted(per_user)} != users of succeeded issues "
                f"{sorted(req.body['userId'] for _, req in issues)}"
            )
        issued, total = self.rig.query(
            "SELECT issued_quantity, total_quantity FROM coupons WHERE id = %s",
            (self.shop.coupon_id,),
        )[0]
        if not issued == len(rows) == len(issues) <= total:
            report.problem(
                f"coupon issued_quantity {issued}, {len(rows)} user coupons, "
                f"{len(issues)} succeeded issues, total {total}"
            )
        for j in self.failed:
            code = self.error_code(j)
            if code == "COUPON_SOLD_OUT" and issued != total:
                report.problem(f"COUPON_SOLD_OUT while {issued} of {total} issued")
            user = self.request_of[j].body.get("userId")
            if code == "COUPON_ALREADY_ISSUED" and user not in per_user:
                report.problem(f"COUPON_ALREADY_ISSUED for user {user} who holds none")

    def check_reads(self) -> None:
        """Once jobs are SUCCEEDED every read reflects them, the product cache included
        (listings within 1 s: polled for a few seconds)."""
        report = self.report
        base = self.rig.base_url
        stocks = dict(self.rig.query("SELECT id, stock FROM products"))
        balances = dict(self.rig.query("SELECT user_id, balance FROM points"))
        with requests.Session() as http:
            for product_id in sorted(self.shop.products):
                got = http.get(f"{base}/v1/products/{product_id}", timeout=15).json()
                if got.get("stock") != stocks[product_id]:
                    report.problem(f"GET product {product_id} {got} != stock {stocks[product_id]}")
            for user in self.shop.users:
                got = http.get(f"{base}/v1/points/{user}", timeout=15).json()
                if got.get("amount") != balances.get(user, 0):
                    report.problem(f"GET points {user} {got} != {balances.get(user, 0)}")
            issued = self.rig.query(
                "SELECT issued_quantity FROM coupons WHERE id = %s", (self.shop.coupon_id,)
            )[0][0]
            got = http.get(f"{base}/v1/coupons/{self.shop.coupon_id}", timeout=15).json()
            if got.get("issuedQuantity") != issued:
                report.problem(f"GET coupon {got} != issued {issued}")

            def listing_matches() -> bool:
                page = http.get(f"{base}/v1/products", params={"size": 100}, timeout=15).json()
                listed = {item["id"]: item["stock"] for item in page.get("items", [])}
                return all(listed.get(p) == stocks[p] for p in self.shop.products)

            deadline = time.monotonic() + 5
            while not listing_matches():
                if time.monotonic() > deadline:
                    report.problem("GET /v1/products still lists old stock after 5 s")
                    break
                time.sleep(0.2)


def check(
    rig: Rig,
    shop: Shop,
    ledger: Ledger,
    name: str,
    *,
    allowed_statuses: frozenset[int] = frozenset({202}),
    recovery_seconds: float | None = None,
    no_answer_ok: bool = False,
) -> Report:
    """Every invariant, exactly, in SQL.  Call after ``wait_settled``.

    ``no_answer_ok``: requests may have got no HTTP answer (the whole stack was
    down); the rows they may have committed are still held to every rule.
    """
    report = Report(name, recovery_seconds=recovery_seconds)
    return Checker(rig, shop, ledger, report).run(allowed_statuses, no_answer_ok=no_answer_ok)


def settle_and_check(
    rig: Rig,
    shop: Shop,
    ledger: Ledger,
    name: str,
    *,
    recovered_at: float,
    recovery_seconds: float | None = None,
    allowed_statuses: frozenset[int] = frozenset({202}),
    timeout: float = 120,
    notes: dict[str, Any] | None = None,
    no_answer_ok: bool = False,
) -> Report:
    """Wait for every job and history (deadline), check every invariant, print the report.

    The recovery time reported is from ``recovered_at`` until settled, unless the
    caller measured it (``recovery_seconds``) before a later phase of load.
    """
    settled = wait_settled(rig, timeout)
    if recovery_seconds is None and settled is not None:
        recovery_seconds = settled - recovered_at
    report = check(
        rig,
        shop,
        ledger,
        name,
        allowed_statuses=allowed_statuses,
        recovery_seconds=recovery_seconds,
        no_answer_ok=no_answer_ok,
    )
    report.notes.update(notes or {})
    if settled is None:
        report.problem(f"jobs or outbox still pending {timeout:.0f}s after recovery")
    report.print()
    if report.problems:
        print(rig.log_excerpt(), flush=True)
    return report


def drains_of(host: str, port: int) -> float | None:
    """``shop_drains_total`` of the worker serving its metrics on ``host:port`` (None: no
    answer)."""
    try:
        text = requests.get(f"http://{host}:{port}/metrics", timeout=2).text
    except requests.RequestException:
        return None
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "shop_drains_total"
    )
