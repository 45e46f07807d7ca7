"""The outermost WSGI layers: the client's address behind proxies, request ids, the access log.

``TRUSTED_PROXY_HOPS=N`` (N > 0) wraps the app in werkzeug's ``ProxyFix(x_for=N)``:
``REMOTE_ADDR`` becomes the address N hops back in ``X-Forwarded-For``, and the rate
limit (keyed on ``remote_addr``) and the access log follow it.  With 0 (the default)
a forwarded header changes nothing: nobody can pick their own rate-limit bucket.

Every answer carries ``X-Request-Id``: the caller's own when it is sane (1-128
characters of ``[A-Za-z0-9._:@+=-]``, so it cannot inject anything into a header or a
log line), else a new one.  With the access log on (``ACCESS_LOG``, on by default with
``LOG_FORMAT=json``) each request writes one line: method, path (no query string:
it can name users), status, duration in ms, client address and request id.  The layer
sits outside the cached product reads (web/hot_reads.py), so those are logged too.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from shared.config import Settings
from shared.logs import AccessWriter, request_id

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

REQUEST_ID = "shop.request_id"  # the environ key of the request's id
_SANE_ID = re.compile(r"[A-Za-z0-9._:@+=-]{1,128}")
access_log = logging.getLogger("shop.access")


class _RequestIds:
    """New request ids: a random prefix per process and a counter (32 hex digits), so a
    request costs no system call for its id; a forked child draws a prefix of its own."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"


_new_id = _RequestIds().next


def install_edge(app: Flask, settings: Settings) -> None:
    """Request ids and the access log, then ProxyFix outermost (so both see the client)."""
    inner: WSGIApplication = app.wsgi_app
    logged = settings.access_log_enabled
    write = _writer(settings) if logged else None

    def wsgi(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        started = time.perf_counter()
        given = environ.get("HTTP_X_REQUEST_ID")
        rid = given if given and _SANE_ID.fullmatch(given) else _new_id()
        environ[REQUEST_ID] = rid
        answer = _Answer(start_response, rid)
        token = request_id.set(rid)
        try:
            return inner(environ, answer.start)
        finally:
            request_id.reset(token)
            if write is not None:
                _log(write, environ, answer.status, rid, started)

    app.wsgi_app = wsgi  # type: ignore[method-assign]  # Flask's middleware idiom
    if settings.trusted_proxy_hops:
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=settings.trusted_proxy_hops
        )


class _Answer:
    """``start_response`` as the app sees it: adds ``X-Request-Id``, notes the status.

    A bound method whose object has ``force_close``, as gunicorn's own ``start_response``
    (web/api.py closes a connection through it, reaching it by ``__self__``)."""

    __slots__ = ("_start_response", "rid", "status")

    def __init__(self, start_response: StartResponse, rid: str) -> None:
        self._start_response = start_response
        self.rid = rid
        self.status = ""

    def start(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        headers.append(("X-Request-Id", self.rid))
        self.status = status
        return self._start_response(status, headers, exc_info)

    def force_close(self) -> None:
        server = getattr(self._start_response, "__self__", None)
        close = getattr(server, "force_close", None)
        if callable(close):
            close()


def _writer(settings: Settings) -> Callable[..., None]:
    if settings.log_format == "json":
        return AccessWriter("web").write

    # Text: the standard library's logger, at its own level (LOG_LEVEL=WARNING quiets
    # the app's lines, not the access log).
    access_log.setLevel(logging.INFO)

    def write(message: str, **fields: Any) -> None:
        access_log.info("%s", message, extra=fields)

    return write


def _log(
    write: Callable[..., None],
    environ: WSGIEnvironment,
    status_line: str,
    rid: str,
    started: float,
) -> None:
    # The status line's code; 500 when the app raised before answering (gunicorn
    # then answers 500 itself).
    status = int(status_line[:3]) if status_line else 500
    method = environ.get("REQUEST_METHOD", "")
    path = environ.get("PATH_INFO", "")
    write(
        f"{method} {path} {status}",
        method=method,
        path=path,
        status=status,
        duration_ms=round((time.perf_counter() - started) * 1000, 3),
        client=environ.get("REMOTE_ADDR", ""),
        request_id=rid,
    )
