"""gunicorn settings of the web process (``gunicorn -c web/gunicorn_conf.py``).

Loaded by path, not as ``python:web.gunicorn_conf``: importing it as a module would
import the ``web`` package (Flask, SQLAlchemy, psycopg, redis) into the master before
the gevent worker monkey-patches the standard library, and psycopg, which picks its
wait function at import, would then block the whole worker on every query.

Requests gunicorn refuses before the app sees them (a bad request line, an
over-long URL or header block, a broken chunked body) would get gunicorn's HTML
error page; API.md allows no HTML answer, so they get the API's JSON error shape.
Bind address, workers and threads stay on the command line (Procfile).

Metrics: with ``PROMETHEUS_MULTIPROC_DIR`` set, every worker writes its metrics into
that folder (web's ``/metrics`` adds them up); ``child_exit`` tells prometheus_client
that a worker is gone, as its multiprocess mode asks.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from gunicorn import util

# gunicorn's per-user control socket is shared by every gunicorn of the user: not wanted.
control_socket_disable = True

_CODES = {403: "FORBIDDEN", 500: "INTERNAL"}


def write_json_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """Drop-in for ``gunicorn.util.write_error`` answering in the API's error shape."""
    code = _CODES.get(status_int, "VALIDATION_ERROR")
    body = json.dumps({"error": {"code": code, "message": mesg or reason, "details": None}})
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body.encode())}\r\n\r\n"
    )
    util.write_nonblock(sock, (head + body).encode())


util.write_error = write_json_error


_format_http_date = util.http_date
_date_of_second: tuple[int, str] = (0, "")


def http_date_of_this_second(timestamp: float | None = None) -> str:
    """Drop-in for ``gunicorn.util.http_date``, formatted once a second.

    gunicorn formats the ``Date`` header of every response anew (``email.utils``:
    ~4 % of a job POST's CPU in web, measured with py-spy); the header has a
    resolution of one second (RFC 9110 §5.6.7), so one string serves a second.
    """
    global _date_of_second  # noqa: PLW0603 (a one-entry cache of the module)
    if timestamp is not None:
        return str(_format_http_date(timestamp))
    now = int(time.time())
    second, text = _date_of_second
    if second != now:
        text = str(_format_http_date(now))
        _date_of_second = (now, text)
    return text


util.http_date = http_date_of_this_second


def child_exit(_server: Any, worker: Any) -> None:
    """A worker exited: drop its live gauges (its counters stay in the sums).

    Imported here, in the master, only when a worker exits, and not the ``web``
    package: prometheus_client alone, which imports no database driver.
    """
    # The master builds no Settings; prometheus_client reads this same variable itself.
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")  # noqa: TID251 (see above)
    if folder:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid, folder)  # type: ignore[no-untyped-call]  # untyped upstream
