"""web/gunicorn_conf.py's drop-ins for gunicorn internals (loaded by path, as gunicorn does)."""

from __future__ import annotations

import email.utils
import importlib.util
import time
from types import ModuleType

from tests.stack import ROOT


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gunicorn_conf", ROOT / "web/gunicorn_conf.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_date_header_is_this_seconds_http_date() -> None:
    conf = _load()
    for _ in range(3):
        before = int(time.time())
        header = conf.http_date_of_this_second()
        after = int(time.time())
        assert header in {
            email.utils.formatdate(second, usegmt=True) for second in range(before, after + 1)
        }
    # An explicit timestamp is formatted as gunicorn would.
    assert conf.http_date_of_this_second(0) == "Thu, 01 Jan 1970 00:00:00 GMT"


def test_the_date_moves_on_with_the_clock() -> None:
    conf = _load()
    first = conf.http_date_of_this_second()
    deadline = time.monotonic() + 3
    while conf.http_date_of_this_second() == first:
        assert time.monotonic() < deadline, "the Date header stayed for over a second"
        time.sleep(0.05)
