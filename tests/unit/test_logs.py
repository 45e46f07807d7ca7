"""shared.logs: the JSON line's shape (one object per record, extras, exceptions, request id)."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from shared.logs import AccessWriter, JsonFormatter, request_id


def _line(record: logging.LogRecord, process: str = "worker") -> dict[str, object]:
    text = JsonFormatter(process).format(record)
    assert "\n" not in text  # one line per record, even with a traceback
    parsed: dict[str, object] = json.loads(text)
    return parsed


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    return logging.getLogger("workers.base").makeRecord(
        "workers.base", logging.WARNING, __file__, 1, msg, args, None, extra=extra
    )


def test_a_line_about_a_job_carries_its_id_and_the_fixed_fields() -> None:
    line = _line(_record("job %s failed (attempt %d)", "j-1", 2, job_id="j-1"))
    assert line["message"] == "job j-1 failed (attempt 2)"
    assert line["job_id"] == "j-1"
    assert line["level"] == "warning"
    assert line["logger"] == "workers.base"
    assert line["process"] == "worker"
    assert isinstance(line["pid"], int)
    assert str(line["timestamp"]).endswith("Z")


def test_an_exception_is_inside_the_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "failed", (), exc_info=sys.exc_info()
        )
    line = _line(record)
    assert "ValueError: boom" in str(line["exception"])


def test_lines_written_while_serving_a_request_carry_its_id() -> None:
    token = request_id.set("req-9")
    try:
        inside = _line(_record("inside"), "web")
    finally:
        request_id.reset(token)
    assert inside["request_id"] == "req-9"
    assert "request_id" not in _line(_record("outside"), "web")


def test_the_access_writer_writes_one_json_line_in_the_same_shape(
    capsys: pytest.CaptureFixture[str],
) -> None:
    AccessWriter("web").write("GET /x 200", method="GET", status=200, request_id="r-1")
    out = capsys.readouterr().err.splitlines()
    assert len(out) == 1
    line = json.loads(out[0])
    assert line["message"] == "GET /x 200"
    assert (line["method"], line["status"], line["request_id"]) == ("GET", 200, "r-1")
    assert (line["level"], line["logger"], line["process"]) == ("info", "shop.access", "web")
    assert str(line["timestamp"]).endswith("Z")
