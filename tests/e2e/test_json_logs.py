"""LOG_FORMAT=json on the real processes: every line of web (gunicorn master and
workers), the partition worker, the history listener and beat is one JSON object,
and web writes one access line per request, whose request id is the X-Request-Id
it answered with.

Its own stack (the session's runs with text logs), on the same database and broker;
the processes log at INFO so that each of them writes something.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from shared.config import redis_url_for
from tests import stack as stack_module
from tests.conftest import ADMIN_TOKEN, wait_job
from tests.e2e.helpers import poll_until
from tests.stack import Stack

pytestmark = pytest.mark.e2e

PROCESSES = ("web", "worker", "history", "beat")


def _lines(path: Path) -> list[dict[str, Any]]:
    parsed = []
    for number, text in enumerate(path.read_text().splitlines(), 1):
        try:
            line = json.loads(text)
        except ValueError:
            pytest.fail(f"{path.name}:{number} is not JSON: {text!r}")
        assert isinstance(line, dict), text
        assert {"timestamp", "level", "logger", "message", "process", "pid"} <= set(line), text
        parsed.append(line)
    return parsed


def test_every_process_writes_json_lines_and_web_one_access_line_per_request(
    database_url: str,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    unique_id: Callable[[], int],
) -> None:
    for name in ("history", "beat"):
        command = [a for a in stack_module.COMMANDS[name] if not a.startswith("--loglevel")]
        monkeypatch.setitem(stack_module.COMMANDS, name, [*command, "--loglevel=INFO"])
    monkeypatch.setitem(
        stack_module.COMMANDS, "worker", [*stack_module.COMMANDS["worker"], "--loglevel=INFO"]
    )
    stack = Stack(
        database_url,
        redis_url_for(redis_url, 0),
        tmp_path,
        admin_token=ADMIN_TOKEN,
        extra_env={"LOG_FORMAT": "json", "LOG_LEVEL": "INFO"},
    )
    logs = {name: tmp_path / f"{name}-{stack.port}.log" for name in PROCESSES}
    http = requests.Session()
    try:
        stack.start_all()
        user = unique_id()
        posted = http.post(
            f"{stack.base_url}/v1/points/charge",
            json={"userId": user, "amount": 5},
            headers={"X-Request-Id": "json-logs-e2e-1"},
            timeout=10,
        )
        assert posted.status_code == 202, posted.text
        assert posted.headers["X-Request-Id"] == "json-logs-e2e-1"
        job_id = posted.json()["jobId"]
        assert wait_job(http, stack.base_url, job_id)["status"] == "SUCCEEDED"
        made = http.get(f"{stack.base_url}/v1/points/{user}", timeout=10)
        assert made.status_code == 200

        def every_process_wrote() -> bool | None:
            written = all(p.exists() and p.stat().st_size > 0 for p in logs.values())
            return True if written else None

        poll_until(every_process_wrote, 60, "a line from every process")

        def access_lines() -> list[dict[str, Any]] | None:
            lines = [x for x in _lines(logs["web"]) if x["logger"] == "shop.access"]
            ids = {x["request_id"] for x in lines}
            wanted = {"json-logs-e2e-1", made.headers["X-Request-Id"]}
            return lines if wanted <= ids else None

        access = poll_until(access_lines, 30, "the access lines of both requests")
    finally:
        http.close()
        stack.stop()
    post_line = next(x for x in access if x["request_id"] == "json-logs-e2e-1")
    assert post_line["method"] == "POST"
    assert post_line["path"] == "/v1/points/charge"
    assert post_line["status"] == 202
    assert post_line["client"] == "127.0.0.1"
    assert isinstance(post_line["duration_ms"], float)
    assert post_line["process"] == "web"
    for name, path in logs.items():
        lines = _lines(path)  # every line, including those written while stopping
        assert lines, name
        assert {x["process"] for x in lines} == {name}, name
