"""An error answer never breaks the client's next request on the same connection.

A body the app does not read (a 413 over 64 KiB, a 401 before the body, a 404 on
an unknown route...) is either drained, and the connection kept, or the answer
says ``Connection: close`` and the server closes it.  Saying ``keep-alive`` and
then closing (what gunicorn did after a 413) makes a pooled client's next,
unrelated request fail with "remote end closed connection".
"""

from __future__ import annotations

import http.client
import json
import uuid
from collections.abc import Callable, Iterator

import pytest
import requests

from tests.conftest import ADMIN
from tests.stack import Stack

pytestmark = pytest.mark.e2e

JSON = {"Content-Type": "application/json"}
OVER = 100_000  # past the 64 KiB limit
LIMIT = 64 * 1024


def _chunked(body: bytes) -> Iterator[bytes]:
    for start in range(0, len(body), 8192):
        yield body[start : start + 8192]


def _padded(size: int) -> bytes:
    """A JSON object of exactly ``size`` bytes."""
    head = b'{"userId": 1, "amount": 1, "pad": "'
    return head + b"x" * (size - len(head) - 2) + b'"}'


# (label, method, path, headers, body, status, closes)
Case = tuple[str, str, str, dict[str, str], bytes | Iterator[bytes], int, bool]


def cases(unique_id: Callable[[], int]) -> list[Case]:
    key = f"reuse-{uuid.uuid4().hex}"
    user = unique_id()
    return [
        ("413", "POST", "/v1/points/charge", JSON, _padded(OVER), 413, True),
        # Chunked: what follows the first 64 KiB + 1 is drained if it ends within 64 KiB more.
        ("413-chunked", "POST", "/v1/points/charge", JSON, _chunked(_padded(OVER)), 413, False),
        (
            "413-chunked-long",
            "POST",
            "/v1/points/charge",
            JSON,
            _chunked(_padded(3 * OVER)),
            413,
            True,
        ),
        ("401-64KiB", "POST", "/v1/products", JSON, _padded(LIMIT), 401, False),
        ("403", "POST", "/v1/products", JSON | {"Authorization": "Bearer no"}, b"{}", 403, False),
        ("404", "POST", "/v1/nowhere", JSON, _padded(LIMIT), 404, False),
        ("405", "DELETE", "/v1/points/charge", JSON, _padded(1000), 405, False),
        (
            "415",
            "POST",
            "/v1/points/charge",
            {"Content-Type": "text/plain"},
            b"x" * 1000,
            415,
            False,
        ),
        ("400", "POST", "/v1/points/charge", JSON, b'{"userId": "1"}', 400, False),
        (
            "202",
            "POST",
            "/v1/points/charge",
            JSON | {"Idempotency-Key": key},
            json.dumps({"userId": user, "amount": 1}).encode(),
            202,
            False,
        ),
        (
            "422",
            "POST",
            "/v1/points/charge",
            JSON | {"Idempotency-Key": key},
            json.dumps({"userId": user, "amount": 2}).encode(),
            422,
            False,
        ),
        ("413-admin", "POST", "/v1/products", JSON | ADMIN, _padded(OVER), 413, True),
    ]


def test_one_connection_survives_every_error_status(
    stack: Stack, unique_id: Callable[[], int]
) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=15)
    try:
        for label, method, path, headers, body, status, closes in cases(unique_id):
            conn.request(method, path, body=body, headers=headers)
            answer = conn.getresponse()
            answer.read()
            assert answer.status == status, label
            assert (answer.getheader("Connection") == "close") is closes, label
            kept = conn.sock
            # The next request on this connection object: on the same socket when it was
            # kept, on a new one when the answer said close; never a dead socket.
            conn.request("GET", "/healthz")
            follow = conn.getresponse()
            assert (follow.status, json.loads(follow.read())) == (200, {"status": "ok"}), label
            assert (kept is None) is closes, label
    finally:
        conn.close()


def test_a_pooled_client_sends_a_413_then_a_normal_request(stack: Stack) -> None:
    with requests.Session() as http_pool:
        http_pool.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=1, max_retries=0))
        for _ in range(3):
            big = http_pool.post(
                stack.base_url + "/v1/points/charge", data=_padded(OVER), headers=JSON, timeout=15
            )
            assert big.status_code == 413
            assert big.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
            assert big.headers["Connection"] == "close"
            assert http_pool.get(stack.base_url + "/healthz", timeout=15).status_code == 200
