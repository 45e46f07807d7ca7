"""Liveness, readiness, metrics and the API document (outside /v1)."""

from __future__ import annotations

import importlib.util
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram
from sqlalchemy import text

from shared.jobs import Backlog, partition_backlogs
from shared.metrics import BacklogCollector, Bound, exposition
from shared.partitions import all_partition_queues
from web.api import build_openapi, operation, settings
from web.render import render
from web.schemas import Health, Readiness, ReadinessChecks


def _swagger_ui_dir() -> Path:
    """Swagger UI's files as the ``flask-swagger-ui`` package ships them (no CDN)."""
    spec = importlib.util.find_spec("flask_swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("flask-swagger-ui is not installed (pip install -e .)")
    return Path(next(iter(spec.submodule_search_locations))) / "dist"


# /docs renders offline: the page and its assets (/docs/assets/...) come from this app.
bp = Blueprint("health", __name__, static_folder=_swagger_ui_dir(), static_url_path="/docs/assets")

REQUESTS = Counter("http_requests_total", "HTTP requests", ["method", "endpoint", "status"])
LATENCY = Histogram("http_request_seconds", "HTTP request latency", ["method", "endpoint"])
_requests = Bound(REQUESTS)
_latency = Bound(LATENCY)

_DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Shop API</title>
<link rel="icon" type="image/png" href="/docs/assets/favicon-32x32.png">
<link rel="stylesheet" href="/docs/assets/swagger-ui.css"></head>
<body><div id="ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui", persistAuthorization: true});</script>
</body></html>
"""


@operation(bp, "/healthz", "GET", summary="Liveness", responses={200: Health})
def get_healthz() -> Response:
    return render(Health(status="ok"))


# A dependency that hangs (a paused server keeps its TCP connections open) must
# still make /readyz answer: each probe gets this long, then counts as down.
PROBE_SECONDS = 2.0
_probes = ThreadPoolExecutor(max_workers=6, thread_name_prefix="readyz")


def _status(future: Future[Any]) -> Literal["ok", "down"]:
    try:
        future.result(timeout=PROBE_SECONDS)
    except Exception:
        return "down"
    return "ok"


@operation(
    bp,
    "/readyz",
    "GET",
    summary="Readiness of database, cache and broker",
    responses={200: Readiness, 503: Readiness},
)
def get_readyz() -> Response:
    extensions = current_app.extensions
    factory = extensions["session_factory"]

    def database() -> None:
        with factory() as session:  # its own session: the probe may outlive the request
            session.execute(text("SELECT 1"))

    database_probe = _probes.submit(database)
    cache_probe = _probes.submit(extensions["cache_redis"].ping)
    broker_probe = _probes.submit(extensions["publisher"].ping)
    checks = ReadinessChecks(
        database=_status(database_probe),
        cache=_status(cache_probe),
        broker=_status(broker_probe),
    )
    ready = all(v == "ok" for v in checks.model_dump().values())
    return render(
        Readiness(status="ok" if ready else "unavailable", checks=checks), 200 if ready else 503
    )


@operation(bp, "/metrics", "GET", summary="Prometheus metrics (text format)", responses={200: None})
def get_metrics() -> Response:
    """Every process's metrics (web's gunicorn workers, the workers, the history listener
    and beat) when PROMETHEUS_MULTIPROC_DIR is set, else this process's; and the backlog
    of every partition, read now (the only metric that costs a query, at scrape time)."""
    factory = current_app.extensions["session_factory"]

    def backlogs() -> dict[str, Backlog]:
        with factory() as session:  # its own session, as /readyz's probe
            return partition_backlogs(session)

    queues = all_partition_queues(settings().partitions)
    text_format = exposition(
        settings().prometheus_multiproc_dir, BacklogCollector(queues, backlogs)
    )
    return Response(text_format, headers={"Content-Type": CONTENT_TYPE_LATEST})


@operation(bp, "/openapi.json", "GET", summary="This OpenAPI document", responses={200: None})
def get_openapi() -> Response:
    document = current_app.extensions.get("openapi")
    if document is None:
        document = build_openapi("Shop API", "1.0.0", jwt=settings().jwt_auth)
        current_app.extensions["openapi"] = document
    return jsonify(document)


@operation(bp, "/docs", "GET", summary="The API document rendered", responses={200: None})
def get_docs() -> Response:
    return Response(_DOCS_PAGE, mimetype="text/html")


def install_metrics(app: Flask) -> None:
    @app.before_request
    def start_timer() -> None:
        g.request_started = time.perf_counter()

    @app.after_request
    def observe(response: Response) -> Response:
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        started = g.get("request_started")
        if started is not None:
            _latency(request.method, endpoint).observe(time.perf_counter() - started)
        _requests(request.method, endpoint, str(response.status_code)).inc()
        return response
