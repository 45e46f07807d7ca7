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

Logs: with ``LOG_FORMAT=json`` gunicorn's own lines (the master's and the workers')
are JSON objects too (``shared.logs``, which imports no database driver).
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from gunicorn import util
from gunicorn.http import wsgi

# gunicorn's per-user control socket is shared by every gunicorn of the user: not wanted.
control_socket_disable = True
# A header line may be 16 KiB (gunicorn's default is 8190 bytes), so that a bearer token
# over API.md's 8 KiB reaches the app and gets its 401, not gunicorn's refusal.
limit_request_field_size = 16 * 1024

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

# The master builds no Settings (see above); LOG_FORMAT is read as shared.config reads it.
if os.environ.get("LOG_FORMAT") == "json":  # noqa: TID251
    from gunicorn.glogging import Logger

    from shared.logs import JsonFormatter

    class JsonLogger(Logger):  # type: ignore[misc]  # gunicorn is untyped
        """gunicorn's own lines (master and workers) as JSON; its access log stays off
        (web writes its own, web/access.py)."""

        def setup(self, cfg: Any) -> None:
            super().setup(cfg)
            for handler in self.error_log.handlers:
                handler.setFormatter(JsonFormatter("web"))

    logger_class = JsonLogger


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


# gunicorn's own write, kept on the class: loaded twice (tests), the conf wraps it, not itself.
_write_in_two_sends = getattr(wsgi.Response, "gunicorn_write", wsgi.Response.write)
wsgi.Response.gunicorn_write = _write_in_two_sends


def write_head_with_body(response: Any, data: Any) -> None:
    """Drop-in for gunicorn's ``Response.write``: the head and a first body part in one send.

    gunicorn sends the status line and headers, then the body, each by its own
    ``sendall`` (a ``getsockopt`` and a ``send`` each: ~5 % of a job POST's CPU in web,
    measured with py-spy, and two TCP segments per answer).  An answer whose body comes
    as one part (every JSON answer of this app) goes out whole in one ``send``; any other
    case (chunked, a body-less status or HEAD, a part past Content-Length, a second
    part) is gunicorn's own ``write``.
    """
    if (
        response.headers_sent
        or response.chunked
        or getattr(response, "_omits_body", True)  # gunicorn < 27: its own path
        or not isinstance(data, bytes)
        or not data
        or (response.response_length is not None and len(data) > response.response_length)
    ):
        _write_in_two_sends(response, data)
        return
    head = response.default_headers()
    head.extend(f"{name}: {value}\r\n" for name, value in response.headers)
    head.append("\r\n")
    response.headers_sent = True
    response.sent += len(data)
    send_whole(response.sock, "".join(head).encode("latin-1") + data)


def send_whole(sock: Any, payload: bytes) -> None:
    """``sock.sendall(payload)`` that asks the socket nothing first.

    gevent's ``sendall`` reads ``SO_SNDBUF`` (a ``getsockopt`` system call) before every
    send to size its chunks; an answer of a few hundred bytes fits a socket's buffer, so
    one ``send`` takes it whole, and only a part that did not fit goes to ``sendall``.
    """
    sent = sock.send(payload)
    if sent < len(payload):
        sock.sendall(memoryview(payload)[sent:])


wsgi.Response.write = write_head_with_body


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
