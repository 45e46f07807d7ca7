"""A real streaming replica: lagging reads are served by it, the rest never; a replica that
lags or stops is skipped, the reads fall back to the primary, and no client sees an error.

The standby is a physical copy of the test's primary (``pg_basebackup -R``, the same
binaries as the embedded server) on its own port.  Which server answered a read is
read from the servers themselves: ``pg_stat_activity`` shows, per connection, the
application (the web's pools say ``shop-test``; the lag checker has its own name) and
the last statement it ran.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
from sqlalchemy.orm import sessionmaker

from shared.config import AppEnv, Settings, to_sqlalchemy_url
from shared.db import make_probe_engine
from shared.embedded import EmbeddedPostgres, EmbeddedStandby
from shared.replicas import Replica, ReplicaSet
from tests.faults.harness import ADMIN, Rig, private_rig, wait_until

pytestmark = pytest.mark.faults

# The web's request pools (shared.db.make_engine: shop-<APP_ENV>).
WEB = "shop-test"


def statements(url: str) -> list[str]:
    """The last statement of each connection the web's pools hold on that server."""
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT query FROM pg_stat_activity WHERE backend_type = 'client backend'"
            " AND application_name = %s",
            (WEB,),
        ).fetchall()
    return [str(r[0]) for r in rows]


def ran(url: str, *fragments: str) -> bool:
    return any(all(f in q for f in fragments) for q in statements(url))


class Reader:
    """Listings in a loop (a new page size each time, so the listing cache never answers)
    until stopped; every answer's status is counted."""

    def __init__(self, base: str, name: str) -> None:
        self.base, self.name = base, name
        self.statuses: Counter[int | str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Reader:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        http = requests.Session()
        size = 0
        while not self._stop.is_set():
            size = size % 100 + 1
            try:
                answer = http.get(
                    f"{self.base}/v1/products",
                    params={"name": self.name, "size": size, "sort": "id"},
                    timeout=30,
                )
                self.statuses[answer.status_code] += 1
            except requests.RequestException as exc:
                self.statuses[type(exc).__name__] += 1


def listing(http: requests.Session, rig: Rig, **params: Any) -> dict[str, Any]:
    answer = http.get(f"{rig.base_url}/v1/products", params=params, timeout=30)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


# Page sizes in turn, so that a listing is read from a database, not the listing cache.
_SIZES = itertools.cycle(range(1, 101))


def listed_on(http: requests.Session, rig: Rig, url: str, *fragments: str, **params: Any) -> bool:
    """List (another page size each time) and say whether that server ran the listing."""
    listing(http, rig, size=next(_SIZES), **params)
    return ran(url, *fragments)


def test_lagging_reads_use_the_standby_and_fall_back_to_the_primary(tmp_path: Path) -> None:
    with private_rig(
        tmp_path,
        {"REPLICA_CHECK_INTERVAL_MS": "200"},
        replicas=1,
        processes=("web", "worker", "history"),
    ) as rig:
        standby = rig.standbys[0]
        http = requests.Session()
        token = f"r{uuid.uuid4().hex[:10]}"
        ids = [
            http.post(
                f"{rig.base_url}/v1/products",
                json={"name": f"{token} {i}", "price": 100 + i, "stock": 10},
                headers=ADMIN,
                timeout=30,
            ).json()["id"]
            for i in range(5)
        ]

        # 1. A listing is served by the standby once its checks show it caught up.
        wait_until(
            lambda: listed_on(
                http,
                rig,
                standby.url,
                "FROM products",
                "ORDER BY products.name",
                name=token,
                sort="name",
            ),
            30,
            "a listing served by the standby",
        )
        body = listing(http, rig, name=token, sort="name")
        assert [p["id"] for p in body["items"]] == ids
        assert body["total"] == 5

        # Order history (it may lag 2 s) goes there too; an order id the standby does not
        # have yet is asked of the primary (no 404 for an order that exists).
        placed = http.post(
            f"{rig.base_url}/v1/orders",
            json={"userId": 7, "orderLines": [{"productId": ids[0], "quantity": 1}]},
            headers={"Prefer": "wait=20"},
            timeout=30,
        ).json()
        assert placed["status"] == "SUCCEEDED", placed
        order_id = placed["result"]["orderId"]
        assert http.get(f"{rig.base_url}/v1/orders/{order_id}/histories", timeout=30).ok

        def history_on_standby() -> bool:
            got = http.get(f"{rig.base_url}/v1/orders/{order_id}/histories", timeout=30)
            assert got.status_code == 200, got.text
            states = [item["status"] for item in got.json()["items"]]
            return states == ["READY"] and ran(standby.url, "order_histories")

        wait_until(history_on_standby, 30, "an order history served by the standby")

        # 2. Reads API.md promises at once never go there: product, order, balance, point
        # history, coupons (none is the last statement of a standby connection).
        for path in (
            f"/v1/products/{ids[1]}",
            f"/v1/orders/{order_id}",
            "/v1/points/7",
            "/v1/points/7/histories",
            "/v1/users/7/coupons",
        ):
            assert http.get(rig.base_url + path, timeout=30).status_code == 200, path
        standby_statements = statements(standby.url)
        assert standby_statements, "the standby's pool connections are gone"
        for table in ("FROM orders", "FROM points", "FROM point_histories", "FROM user_coupons"):
            assert not any(table in q and "order_histories" not in q for q in standby_statements)

        # 3. A standby that stops replaying is skipped: a stock change SUCCEEDED, the
        # listing shows it (from the primary), while the paused standby still has the old.
        with psycopg.connect(standby.url, autocommit=True) as conn:
            conn.execute("SELECT pg_wal_replay_pause()")
        done = http.put(
            f"{rig.base_url}/v1/products/{ids[2]}/stock",
            json={"stock": 777},
            headers={**ADMIN, "Prefer": "wait=20"},
            timeout=30,
        ).json()
        assert done["status"] == "SUCCEEDED", done
        assert http.get(f"{rig.base_url}/v1/products/{ids[2]}", timeout=30).json()["stock"] == 777

        def listing_shows_777() -> bool:
            items = listing(http, rig, name=token, size=50)["items"]
            return {p["id"]: p["stock"] for p in items}[ids[2]] == 777

        wait_until(listing_shows_777, 10, "the listing reflecting the stock change")
        with psycopg.connect(standby.url, autocommit=True) as conn:
            row = conn.execute("SELECT stock FROM products WHERE id = %s", (ids[2],)).fetchone()
            assert row == (10,)  # paused: the listing above did not come from it
            conn.execute("SELECT pg_wal_replay_resume()")
        wait_until(
            lambda: listed_on(
                http,
                rig,
                standby.url,
                "ORDER BY products.price DESC",
                name=token,
                sort="price",
                order="desc",
            ),
            30,
            "the standby serving again once it replays",
        )

        # 4. The standby stops while listings run: every answer is a 200; the primary
        # takes the reads (its connections now ran the listing), and the standby is used
        # again once it is back.
        # Each round's primary listing has a shape no earlier listing had.
        shapes = {
            "stop": ("ORDER BY products.created_at DESC", {"sort": "createdAt", "order": "desc"}),
            "kill": ("products.stock = ", {"inStock": "false"}),
        }
        for how, (marker, params) in shapes.items():
            with Reader(rig.base_url, token) as reader:
                wait_until(lambda: sum(reader.statuses.values()) >= 20, 30, "reads before")
                (standby.stop if how == "stop" else standby.kill)()
                seen = sum(reader.statuses.values())
                wait_until(
                    lambda seen=seen: sum(reader.statuses.values()) >= seen + 50,
                    60,
                    f"reads after {how}",
                )
            assert set(reader.statuses) == {200}, (how, reader.statuses, rig.log_excerpt())
            listing(http, rig, name=token, size=next(_SIZES), **params)
            assert ran(rig.pg.url, marker), how
            standby.start()  # from its own data: it catches up by streaming
            wait_until(
                lambda: listed_on(
                    http, rig, standby.url, "ORDER BY products.id DESC", name=token, order="desc"
                ),
                60,
                f"the standby serving again after {how}",
            )
        http.close()


class Clock:
    """The checker's clock, moved by the test: coverage is asserted without sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_coverage_follows_the_standbys_replay(tmp_path: Path) -> None:
    primary = EmbeddedPostgres(tmp_path / "primary")
    standby = EmbeddedStandby(primary, tmp_path / "standby")
    settings = Settings(database_url=primary.url, app_env=AppEnv.TEST)
    try:
        primary.start()
        standby.start()
        probes = [
            make_probe_engine(settings, to_sqlalchemy_url(u), n)
            for u, n in ((primary.url, "p"), (standby.url, "s"))
        ]
        replica = Replica("replica0", sessionmaker(bind=probes[1]), probes[1])
        clock = Clock()
        replicas = ReplicaSet(probes[0], [replica], max_lag=1.0, interval=0.5, clock=clock)

        def checked_at(moment: float) -> bool:
            clock.now = moment
            replicas.check()
            return replica.covered_at == moment

        # Caught up (idle primary, nothing to replay): it covers each check's moment.
        wait_until(lambda: checked_at(clock.now + 1), 30, "the standby covering a check")
        covered = clock.now
        assert replicas.pick(0.5) is not None
        with psycopg.connect(primary.url, autocommit=True) as conn:
            conn.execute("CREATE TABLE marks (n int)")
        wait_until(lambda: checked_at(clock.now + 1), 30, "the standby covering the write")
        assert replica.covered_at is not None
        assert replica.covered_at > covered

        # Replay paused and a commit on the primary: coverage stays before the commit.
        with psycopg.connect(standby.url, autocommit=True) as conn:
            conn.execute("SELECT pg_wal_replay_pause()")
            wait_until(
                lambda: (
                    conn.execute("SELECT pg_get_wal_replay_pause_state()").fetchone() == ("paused",)
                ),
                30,
                "replay paused",
            )
        before_commit = clock.now
        with psycopg.connect(primary.url, autocommit=True) as conn:
            conn.execute("INSERT INTO marks VALUES (1)")
        for step in range(1, 6):
            assert not checked_at(before_commit + step)
            assert replica.covered_at is not None
            assert replica.covered_at <= before_commit
        assert replicas.pick(1.0) is None  # 5 s behind: lagging reads go to the primary
        assert replica.healthy  # lagging, not down: it comes back by itself

        with psycopg.connect(standby.url, autocommit=True) as conn:
            conn.execute("SELECT pg_wal_replay_resume()")
        wait_until(lambda: checked_at(clock.now + 1), 30, "the standby catching up")
        assert replicas.pick(1.0) is not None

        # Stopped: unhealthy at the next check, back when it is.
        standby.stop()
        replicas.check()
        assert not replica.healthy
        assert replicas.pick(60.0) is None
        standby.start()
        wait_until(lambda: checked_at(clock.now + 1) and replica.healthy, 60, "back")
        for engine in probes:
            engine.dispose()
    finally:
        standby.stop()
        primary.stop()
