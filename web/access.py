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

import logging
import re
import time
import uuid
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


def install_edge(app: Flask, settings: Settings) -> None:
    """Request ids and the access log, then ProxyFix outermost (so both see the client)."""
    inner: WSGIApplication = app.wsgi_app
    logged = settings.access_log_enabled
    write = _writer(settings) if logged else None

    def wsgi(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        started = time.perf_counter()
        given = environ.get("HTTP_X_REQUEST_ID")
        rid = given if given and _SANE_ID.fullmatch(given) else uuid.uuid4().hex
        environ[REQUEST_ID] = rid
        statuses: list[str] = []

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            headers.append(("X-Request-Id", rid))
            statuses.append(status)
            return start_response(status, headers, exc_info)

        token = request_id.set(rid)
        try:
            return inner(environ, start)
        finally:
            request_id.reset(token)
            if write is not None:
                _log(write, environ, statuses, rid, started)

    app.wsgi_app = wsgi  # type: ignore[method-assign]  # Flask's middleware idiom
    if settings.trusted_proxy_hops:
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=settings.trusted_proxy_hops
        )


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
    statuses: list[str],
    rid: str,
    started: float,
) -> None:
    # The status line's code; 500 when the app raised before answering (gunicorn
    # then answers 500 itself).
    status = int(statuses[-1][:3]) if statuses else 500
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
