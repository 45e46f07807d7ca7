"""AUTH_MODE=jwt over real gunicorn: what only the real server shows (header limits, the
long poll of another user's job, the start refused in production)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import requests

from tests.conftest import ADMIN
from tests.stack import Stack, run_in_production
from tests.tokens import ADMIN_SCOPE, bearer, hs256

pytestmark = pytest.mark.e2e


def test_a_token_over_8_kib_is_a_json_401_not_a_server_refusal(
    jwt_stack: Stack, unique_id: Callable[[], int]
) -> None:
    user = unique_id()
    token = hs256(user, pad="x" * 9000)
    assert 8 * 1024 < len(token) < 16 * 1024
    answer = requests.post(
        f"{jwt_stack.base_url}/v1/points/charge",
        json={"amount": 1},
        headers=bearer(token),
        timeout=30,
    )
    assert answer.status_code == 401, answer.text
    assert answer.json()["error"]["code"] == "UNAUTHENTICATED"
    assert answer.headers["WWW-Authenticate"] == 'Bearer realm="shop", error="invalid_token"'


def test_a_users_job_is_theirs_to_poll_and_another_users_long_poll_is_a_404(
    jwt_stack: Stack, unique_id: Callable[[], int]
) -> None:
    owner, other = unique_id(), unique_id()
    base = jwt_stack.base_url
    answer = requests.post(
        f"{base}/v1/points/charge", json={"amount": 40}, headers=bearer(hs256(owner)), timeout=30
    )
    assert answer.status_code == 202, answer.text
    status_url = base + answer.json()["statusUrl"]
    # Another user's long poll answers at once, as for an unknown id (it does not wait).
    started = time.monotonic()
    refused = requests.get(status_url, params={"wait": 5}, headers=bearer(hs256(other)), timeout=30)
    assert refused.status_code == 404
    assert time.monotonic() - started < 4
    deadline = time.monotonic() + 60
    while True:
        job = requests.get(
            status_url, params={"wait": 10}, headers=bearer(hs256(owner)), timeout=30
        ).json()
        if job["status"] != "PENDING" or time.monotonic() > deadline:
            break
    assert job["status"] == "SUCCEEDED"
    assert job["result"] == {"userId": owner, "amount": 40}
    for admin in (ADMIN, bearer(hs256(other, scope=ADMIN_SCOPE))):
        assert requests.get(status_url, headers=admin, timeout=30).status_code == 200
    balance = requests.get(f"{base}/v1/points/{owner}", headers=bearer(hs256(owner)), timeout=30)
    assert balance.json() == {"userId": owner, "amount": 40}


_LOAD_SETTINGS = "from shared.config import Settings; Settings.from_env()"


@pytest.mark.parametrize(("auth_mode", "refused"), [(None, True), ("none", False)])
def test_production_refuses_to_start_without_an_explicit_auth_mode(
    auth_mode: str | None, refused: bool
) -> None:
    answer = run_in_production(
        # Refused: the web process's own entry point stops at its settings.  Accepted: the
        # settings load (the rest of a start needs servers this test does not run).
        ["-c", "import web.wsgi" if refused else _LOAD_SETTINGS],
        **({} if auth_mode is None else {"AUTH_MODE": auth_mode}),
    )
    assert (answer.returncode != 0) is refused, answer.stderr
    assert ("AUTH_MODE is required when APP_ENV=production" in answer.stderr) is refused
