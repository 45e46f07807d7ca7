"""Fixtures on real PostgreSQL and Redis (``make test`` starts embedded ones).

* ``database_url``: a database of this run, built by ``alembic upgrade head``.
* ``db_session``: unit/api isolation, one outer transaction rolled back after the
  test; the code under test may commit (it commits a savepoint).
* ``client``: the Flask test client on that session with a recording publisher.
* ``stack``: e2e, the real gunicorn + partition worker + history + beat over HTTP,
  on committed data (each test uses its own fresh ids).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker
from urllib3.util.retry import Retry

from shared.config import AppEnv, Settings, redis_url_for, to_sqlalchemy_url
from shared.embedded import migrate
from tests.databases import scratch_database
from tests.stack import Stack
from tests.tokens import SECRET, UserTokens

ADMIN_TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.exit(f"{name} is not set: run the suite with `make test` (it starts the servers)", 2)
    return value


@pytest.fixture(scope="session")
def server_urls() -> tuple[str, str]:
    return _env("DATABASE_URL"), _env("REDIS_URL")


@pytest.fixture(scope="session")
def database_url(server_urls: tuple[str, str]) -> Iterator[str]:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    name = f"test_{worker}_{uuid.uuid4().hex[:8]}"
    with scratch_database(server_urls[0], name) as url:
        migrate(url)
        yield url


@pytest.fixture(scope="session")
def redis_url(server_urls: tuple[str, str]) -> str:
    url = server_urls[1]
    client = redis.Redis.from_url(url)
    client.flushall()
    client.close()
    return url


@pytest.fixture(scope="session")
def settings(database_url: str, redis_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        app_env=AppEnv.TEST,
        admin_token=ADMIN_TOKEN,
        rate_limit="off",
    )


@pytest.fixture(scope="session")
def engine(settings: Settings) -> Iterator[Engine]:
    eng = create_engine(to_sqlalchemy_url(settings.database_url), pool_size=20, max_overflow=20)
    yield eng
    eng.dispose()


@pytest.fixture
def session_factory(engine: Engine) -> Iterator[sessionmaker[Session]]:
    """Sessions joined to one outer transaction that is rolled back after the test."""
    connection = engine.connect()
    outer = connection.begin()
    factory = sessionmaker(
        bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
    )
    yield factory
    outer.rollback()
    connection.close()


@pytest.fixture
def db_session(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    session = session_factory()
    yield session
    session.close()


class RecordingPublisher:
    """Records wake-ups instead of sending them (after a JSON round trip, as the wire would)."""

    def __init__(self) -> None:
        self.woken: list[str] = []
        self.fail = False

    def wake(self, queue: str) -> None:
        if self.fail:
            raise ConnectionError("broker down (simulated)")
        self.woken.append(json.loads(json.dumps(queue)))

    def wake_many(self, queues: list[str]) -> None:
        for queue in queues:
            self.wake(queue)

    def ping(self) -> None:
        if self.fail:
            raise ConnectionError("broker down (simulated)")


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def app(
    settings: Settings, session_factory: sessionmaker[Session], publisher: RecordingPublisher
) -> Flask:
    return create_test_app(settings, session_factory, publisher)


def create_test_app(
    settings: Settings, session_factory: sessionmaker[Session], publisher: RecordingPublisher
) -> Flask:
    from web import create_app

    app = create_app(settings, session_factory=session_factory, publisher=publisher)
    app.config["TESTING"] = True
    return app


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def runtime(settings: Settings, session_factory: sessionmaker[Session]) -> Any:
    """A worker runtime on the test session; sends are recorded, not published."""
    from workers.base import Runtime

    sent: list[str] = []
    rt = Runtime(settings, sent.append)
    rt.use_session_factory(session_factory)
    rt.sent = sent  # type: ignore[attr-defined]
    return rt


# ---- e2e ------------------------------------------------------------------


@pytest.fixture(scope="session")
def plain_stack(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The real processes, shared by the e2e tests of this run (AUTH_MODE=none)."""
    log_dir = Path(tmp_path_factory.mktemp("stack-logs"))
    running = Stack(database_url, redis_url_for(redis_url, 0), log_dir, admin_token=ADMIN_TOKEN)
    try:
        running.start_all()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def jwt_stack(plain_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A second web process with AUTH_MODE=jwt (HS256, ``tests.tokens.SECRET``) in front of
    the same database, Redis and workers: only how a request proves its user differs."""
    running = Stack(
        plain_stack.database_url,
        plain_stack.redis_url,
        Path(tmp_path_factory.mktemp("jwt-stack-logs")),
        admin_token=ADMIN_TOKEN,
        extra_env={"AUTH_MODE": "jwt", "AUTH_JWT_SECRET": SECRET},
    )
    try:
        running.start("web")
        yield running
    finally:
        running.stop()


# Run an e2e test in both customer identity modes: ``@pytest.mark.parametrize("stack",
# AUTH_MODES, indirect=True)`` (tests.e2e.helpers.both_auth_modes).
AUTH_MODES = ("none", "jwt")


@pytest.fixture(scope="session")
def stack(request: pytest.FixtureRequest) -> Stack:
    """The stack a test talks to: AUTH_MODE=none, or jwt when parametrized so."""
    mode = getattr(request, "param", "none")
    running: Stack = request.getfixturevalue("jwt_stack" if mode == "jwt" else "plain_stack")
    return running


@pytest.fixture
def http(stack: Stack) -> Iterator[requests.Session]:
    session = requests.Session()
    if stack.extra_env.get("AUTH_MODE") == "jwt":
        # Each request carries the token of the user it names (an admin's for a read of a
        # job or order by id); the tests themselves stay as they are.
        session.auth = UserTokens()
    # A pooled keep-alive connection the server closes as the next request goes out is a
    # race of HTTP itself: reads retry it; job POSTs and PUTs never do, so a test never
    # sends a job twice without knowing.
    retry = Retry(
        total=3, connect=3, read=2, status=0, backoff_factor=0.05, allowed_methods={"GET", "HEAD"}
    )
    adapter = requests.adapters.HTTPAdapter(pool_connections=8, pool_maxsize=256, max_retries=retry)
    session.mount("http://", adapter)
    yield session
    session.close()


def wait_job(
    http: requests.Session, base_url: str, job_id: str, timeout: float = 60
) -> dict[str, Any]:
    """Long-poll a job until it finishes (fails the test past ``timeout``)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = http.get(
            f"{base_url}/v1/jobs/{job_id}", params={"wait": 10}, timeout=15
        ).json()
        if body["status"] != "PENDING":
            return body
    pytest.fail(f"job {job_id} still PENDING after {timeout}s")


@pytest.fixture
def unique_id() -> Callable[[], int]:
    """Fresh user ids for committed e2e data (no two tests share a user)."""
    base = uuid.uuid4().int % 10**12 * 1000

    counter = iter(range(1, 10**6))
    return lambda: base + next(counter)
