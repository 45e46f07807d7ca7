"""Requests gunicorn itself refuses, and chunked bodies: still the API's JSON errors."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable

import pytest
import requests
from sqlalchemy import Engine, func, select

from shared.models import Job
from tests.stack import Stack

pytestmark = pytest.mark.e2e


def _raw(stack: Stack, payload: bytes) -> tuple[int, str, dict[str, object]]:
    """Send raw bytes; return the status, the content type and the JSON body."""
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        sock.sendall(payload)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data:
                head, _, body = data.partition(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                if len(body) >= length:
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers["content-type"], json.loads(body)


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", 400),
        (b"GET /v1/products?name=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        # Over gunicorn's header line limit (16 KiB: a bearer token over 8 KiB gets the app's 401).
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n", 431),
        (
            b"POST /v1/points/charge HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\nZZZ\r\n{}\r\n0\r\n\r\n",
            400,
        ),
    ],
)
def test_requests_gunicorn_refuses_get_the_json_error_shape(
    stack: Stack, payload: bytes, status: int
) -> None:
    got, content_type, body = _raw(stack, payload)
    assert got == status
    assert content_type == "application/json"
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}  # type: ignore[arg-type]


def test_a_chunked_body_over_64_kib_is_413_and_accepts_nothing(
    stack: Stack, engine: Engine, unique_id: Callable[[], int]
) -> None:
    user = unique_id()
    body = json.dumps({"userId": user, "amount": 1}).encode() + b" " * 70_000

    def chunks():  # type: ignore[no-untyped-def]
        for start in range(0, len(body), 8192):
            yield body[start : start + 8192]

    answer = requests.post(
        f"{stack.base_url}/v1/points/charge",
        data=chunks(),
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    with engine.connect() as conn:
        count = conn.execute(
            select(func.count()).select_from(Job).where(Job.payload["userId"].astext == str(user))
        )
        assert count.scalar_one() == 0


def test_a_small_chunked_body_is_accepted(stack: Stack, unique_id: Callable[[], int]) -> None:
    body = json.dumps({"userId": unique_id(), "amount": 1}).encode()
    answer = requests.post(
        f"{stack.base_url}/v1/points/charge",
        data=iter([body[:5], body[5:]]),
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert answer.status_code == 202
