"""The edge of web: client address behind proxies (TRUSTED_PROXY_HOPS), X-Request-Id, access log."""

from __future__ import annotations

import dataclasses
import logging
import random

import flask
import pytest
from flask import Flask
from sqlalchemy.orm import Session, sessionmaker

from shared.config import ConfigError, Settings
from tests.conftest import RecordingPublisher, create_test_app

BODY = {"userId": 1, "amount": 1}


def _address() -> str:
    # Each test its own addresses: the limiter's buckets live in Redis for the whole run.
    return f"198.18.{random.randrange(256)}.{random.randrange(1, 255)}"


def _app(
    settings: Settings,
    session_factory: sessionmaker[Session],
    publisher: RecordingPublisher,
    **changes: object,
) -> Flask:
    return create_test_app(
        dataclasses.replace(settings, rate_limit="2/day", **changes),  # type: ignore[arg-type]
        session_factory,
        publisher,
    )


def test_a_forwarded_header_from_an_untrusted_peer_changes_nothing(
    settings: Settings, session_factory: sessionmaker[Session], publisher: RecordingPublisher
) -> None:
    client = _app(settings, session_factory, publisher).test_client()
    client.environ_base["REMOTE_ADDR"] = _address()
    # A new spoofed address on every call: still one bucket, the peer's.
    statuses = [
        client.post(
            "/v1/points/charge",
            json=BODY,
            headers={"X-Forwarded-For": _address(), "Forwarded": f"for={_address()}"},
        ).status_code
        for _ in range(3)
    ]
    assert statuses == [202, 202, 429]


def test_behind_one_trusted_proxy_each_client_has_its_own_allowance(
    settings: Settings, session_factory: sessionmaker[Session], publisher: RecordingPublisher
) -> None:
    client = _app(settings, session_factory, publisher, trusted_proxy_hops=1).test_client()
    client.environ_base["REMOTE_ADDR"] = _address()  # the proxy, the same for both clients
    alice, bob = _address(), _address()

    def post(who: str) -> int:
        # A client-supplied first entry is ignored: only the proxy's own hop counts.
        headers = {"X-Forwarded-For": f"{_address()}, {who}"}
        return client.post("/v1/points/charge", json=BODY, headers=headers).status_code

    assert [post(alice), post(alice), post(bob), post(bob)] == [202, 202, 202, 202]
    assert post(alice) == 429
    assert post(bob) == 429


def test_request_id_is_echoed_when_sane_and_made_otherwise(app: Flask) -> None:
    client = app.test_client()
    given = client.get("/healthz", headers={"X-Request-Id": "lb-1234.abc"})
    assert given.headers["X-Request-Id"] == "lb-1234.abc"
    for bad in ("x" * 129, "a b", "a\u00e9", ""):
        made = client.get("/healthz", headers={"X-Request-Id": bad})
        assert made.headers["X-Request-Id"] != bad
        assert len(made.headers["X-Request-Id"]) == 32
    first = client.get("/healthz").headers["X-Request-Id"]
    assert first != client.get("/healthz").headers["X-Request-Id"]
    # Errors and JSON 404s carry it too.
    assert "X-Request-Id" in client.get("/v1/nothing-here").headers


def test_the_access_log_has_one_line_per_request_with_the_client_behind_the_proxy(
    settings: Settings,
    session_factory: sessionmaker[Session],
    publisher: RecordingPublisher,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = _app(settings, session_factory, publisher, trusted_proxy_hops=1, access_log="on")
    client = app.test_client()
    proxy, who = _address(), _address()
    client.environ_base["REMOTE_ADDR"] = proxy
    with caplog.at_level(logging.INFO, logger="shop.access"):
        answer = client.post(
            "/v1/points/charge?x=1",
            json=BODY,
            headers={"X-Forwarded-For": who, "X-Request-Id": "req-1"},
        )
    lines = [r for r in caplog.records if r.name == "shop.access"]
    assert len(lines) == 1
    line = lines[0]
    assert answer.status_code == 202
    assert (line.method, line.path, line.status) == ("POST", "/v1/points/charge", 202)  # type: ignore[attr-defined]
    assert line.client == who  # type: ignore[attr-defined]
    assert line.request_id == "req-1"  # type: ignore[attr-defined]
    assert 0 <= line.duration_ms < 60_000  # type: ignore[attr-defined]


def test_the_access_log_is_off_by_default_with_text_logs(
    app: Flask, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="shop.access"):
        app.test_client().get("/healthz")
    assert not [r for r in caplog.records if r.name == "shop.access"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("trusted_proxy_hops", -1), ("log_format", "xml"), ("access_log", "maybe")],
)
def test_edge_settings_are_checked(settings: Settings, field: str, value: object) -> None:
    with pytest.raises(ConfigError):
        dataclasses.replace(settings, **{field: value})  # type: ignore[arg-type]


def test_no_cookie_session_is_kept_or_set(app: Flask) -> None:
    """Every request shares one read-only empty session; no answer sets a cookie."""
    seen = []
    with app.test_request_context("/v1/products"):
        app.preprocess_request()
        seen.append(flask.session)
    with app.test_request_context("/v1/products/1"):
        seen.append(flask.session)
        with pytest.raises(RuntimeError):
            flask.session["user"] = 1  # a null session refuses writes
    assert seen[0] is seen[1]
    assert not seen[0]
    client = app.test_client()
    for path in ("/v1/products", "/healthz", "/v1/nowhere"):
        assert "Set-Cookie" not in client.get(path).headers
