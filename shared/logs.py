"""How every process logs: ``LOG_FORMAT=text`` (the default) or ``json``.

``json`` is for container platforms, which collect a process's output line by line:
every record of every logger (ours, gunicorn's, Celery's, warnings) becomes one JSON
object on one line of stderr, rendered by structlog's ``ProcessorFormatter`` from the
standard library's records, so no call site changes.  Fields: ``timestamp`` (UTC,
ISO 8601), ``level``, ``logger``, ``message``, ``process`` (web, worker, history,
beat), ``pid``; ``exception`` with the traceback when there is one; whatever
the call passed in ``extra=`` (``job_id`` on every line about a job, the access log's
fields); ``request_id`` on every line written while web serves a request.  web's
access lines, on the hot path, take a cheaper road to the same shape (``AccessWriter``).

This module imports the standard library and structlog only: gunicorn's master loads
it (web/gunicorn_conf.py) before the gevent worker patches the standard library.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

# The id of the request web is serving (set by web's access log middleware); a
# ContextVar, so each gevent greenlet and each thread sees its own.
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


# This process's id, kept rather than asked for per line (a system call, which costs
# more than the rest of a line on some hosts); a forked child (gunicorn's workers)
# updates it.
_pid = os.getpid()


def _refresh_pid() -> None:
    global _pid  # noqa: PLW0603  # the one per-process value, renewed after fork
    _pid = os.getpid()


os.register_at_fork(after_in_child=_refresh_pid)


def _add_request_id(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
    current = request_id.get()
    if current is not None and "request_id" not in event:
        event["request_id"] = current
    return event


class JsonFormatter(structlog.stdlib.ProcessorFormatter):
    """One JSON object per record; ``process`` names the program (web, worker, ...)."""

    def __init__(self, process: str = "") -> None:
        fixed = {"process": process or _program_name()}

        def add_fixed(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
            event.update(fixed)
            event["pid"] = _pid
            return event

        super().__init__(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
                structlog.stdlib.ExtraAdder(),
                add_fixed,
                _add_request_id,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.EventRenamer("message"),
                structlog.processors.JSONRenderer(sort_keys=False),
            ],
        )


class AccessWriter:
    """web's access lines in JSON, on the hot path: structlog's own pipeline straight to
    stderr, skipping the standard library's record (and ProcessorFormatter's copy of it),
    which cost about ten times as much per line (README, Logs).  The line has the shape
    of every other JSON line, logger ``shop.access``."""

    def __init__(self, process: str) -> None:
        fixed = {"logger": "shop.access", "process": process}

        def add_fixed(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
            event.update(fixed)
            event["pid"] = _pid
            return event

        self._log = structlog.wrap_logger(
            structlog.WriteLogger(sys.stderr),
            processors=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
                add_fixed,
                structlog.processors.EventRenamer("message"),
                structlog.processors.JSONRenderer(),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
            cache_logger_on_first_use=True,
        )

    def write(self, message: str, **fields: Any) -> None:
        self._log.info(message, **fields)


def _program_name() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"


def configure(log_format: str, level: str | int, process: str) -> None:
    """The root logger writes to stderr as ``log_format`` says (text: as ``basicConfig``)."""
    if log_format != "json":
        logging.basicConfig(level=level, format=TEXT_FORMAT)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    # Loggers that bring their own handlers (Celery's, gunicorn's) write through ours.
    for name in ("celery", "celery.task", "celery.redirected"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
    logging.captureWarnings(True)  # a warning is a log line too, not bare text on stderr


def raw_line(message: str, process: str, level: str = "warning", logger: str = "") -> bytes:
    """A JSON line built without the logging machinery (no lock: safe in a signal
    handler), for text that a library writes straight to a file descriptor."""
    now = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
    line = {
        "level": level,
        "logger": logger,
        "timestamp": now,
        "process": process,
        "pid": _pid,
        "message": message.strip(),
    }
    return (json.dumps(line) + "\n").encode()
