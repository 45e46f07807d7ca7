"""The HTTP ingress: validates, records jobs, answers reads.  ``create_app()`` builds it."""

from __future__ import annotations

import uuid
from typing import Any

from flask import Flask, Request, Response, g
from flask.sessions import NullSession, SessionInterface, SessionMixin
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from sqlalchemy.orm import Session, sessionmaker

from shared.cache import ProductCache, make_redis, redis_keepalive_options
from shared.config import Settings, to_sqlalchemy_url
from shared.db import make_engine, make_probe_engine, make_session_factory
from shared.jobs import document_of, get_finished_jobs
from shared.logs import configure as configure_logging
from shared.metrics import prepare_multiprocess_dir
from shared.replicas import Replica, ReplicaSet
from shared.top_sellers_cache import TopSellersCache
from web import access, admin, coupons, health, jobs, orders, points, products, users
from web.api import ApiResponse, IdConverter, install_connection_handling, remember_routes
from web.errors import register_error_handlers
from web.hot_reads import install_hot_product_reads
from web.identity import TokenVerifier
from web.publish import Publisher, install_publishing
from web.session import install_sessions
from web.waiters import JobWaiters, Recheck

BLUEPRINTS = (
    points.bp,
    products.bp,
    orders.bp,
    coupons.bp,
    users.bp,
    jobs.bp,
    admin.bp,
    health.bp,
)


def create_app(
    settings: Settings | None = None,
    *,
    session_factory: sessionmaker[Session] | None = None,
    publisher: Publisher | None = None,
) -> Flask:
    settings = settings or Settings.from_env()
    configure_logging(settings.log_format, settings.log_level, "web")
    app = Flask(__name__)
    app.response_class = ApiResponse
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]  # DefaultJSONProvider option
    app.url_map.strict_slashes = False
    app.url_map.converters["id"] = IdConverter
    # No implicit OPTIONS answers (an empty text/html 200): OPTIONS is a JSON 405 with Allow.
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    app.session_interface = NoCookieSessions()
    app.extensions["settings"] = settings
    # AUTH_MODE=jwt: a key source that cannot be loaded stops the start, not the first call.
    app.extensions["token_verifier"] = TokenVerifier(settings) if settings.jwt_auth else None
    prepare_multiprocess_dir(settings.prometheus_multiproc_dir)

    recheck: Recheck | None = None
    if session_factory is None:
        engine = make_engine(settings, pre_ping=False)
        session_factory = make_session_factory(engine)
        # The same pool, its connections switched to autocommit while checked out (a
        # local setting: no round trip), so a connection lost to a database restart
        # is found, and the pool renewed, whichever path meets it first.
        app.extensions["autocommit_engine"] = engine.execution_options(isolation_level="AUTOCOMMIT")
        # The group commit of job rows writes one batch at a time per process, on a
        # connection of its own, in autocommit (web.publish._write_batch).
        app.extensions["job_writer_engine"] = make_engine(
            settings, pool_size=1, pre_ping=False, isolation_level="AUTOCOMMIT"
        )
        recheck = finished_documents(session_factory)
        app.extensions["primary_read_factory"] = make_session_factory(
            app.extensions["autocommit_engine"]
        )
        if settings.replica_urls:
            app.extensions["replicas"] = start_replicas(settings)
    app.extensions["session_factory"] = session_factory

    cache_client = make_redis(settings.cache_url, timeout=0.25, settings=settings)
    app.extensions["cache_redis"] = cache_client
    app.extensions["product_cache"] = ProductCache(cache_client, settings.cache_ttl_seconds)
    app.extensions["top_sellers_cache"] = TopSellersCache(
        cache_client, settings.top_sellers_cache_seconds
    )
    app.extensions["job_waiters"] = JobWaiters(
        make_redis(settings.broker_url, timeout=2.0, settings=settings),
        recheck,
        registry=make_redis(settings.broker_url, timeout=1.0, settings=settings),
    )
    install_publishing(app, settings, publisher)
    _install_rate_limit(app, settings)
    install_sessions(app)
    register_error_handlers(app)
    health.install_metrics(app)
    install_connection_handling(app)
    install_hot_product_reads(app, app.extensions["product_cache"])
    for bp in BLUEPRINTS:
        app.register_blueprint(bp)
    remember_routes(app)
    # Last: the outermost layers (client address, request id, access log).
    access.install_edge(app, settings)
    return app


class NoCookieSessions(SessionInterface):
    """The API keeps no cookie sessions: one empty, read-only session serves every request
    (Flask's default builds a null session per request, ~1 % of a job POST)."""

    _none = NullSession()

    def open_session(self, app: Flask, request: Request) -> NullSession:
        return self._none

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        return None


def start_replicas(settings: Settings) -> ReplicaSet:
    """An engine per replica (autocommit: a lagging read is one statement or two) and the
    lag checker, running in this process (a greenlet under gevent)."""
    replicas = [
        Replica(
            name=f"replica{i}",
            sessions=make_session_factory(
                make_engine(settings, url=to_sqlalchemy_url(url), pre_ping=False).execution_options(
                    isolation_level="AUTOCOMMIT"
                )
            ),
            probe=make_probe_engine(settings, to_sqlalchemy_url(url), f"replica-check{i}"),
        )
        for i, url in enumerate(settings.replica_urls)
    ]
    replica_set = ReplicaSet(
        make_probe_engine(settings, settings.sqlalchemy_url, "replica-check"),
        replicas,
        max_lag=settings.replica_max_lag_ms / 1000,
        interval=settings.replica_check_interval_ms / 1000,
    )
    replica_set.start()
    return replica_set


def finished_documents(factory: sessionmaker[Session]) -> Recheck:
    """The waiters' safety net: status documents of those jobs that have finished."""

    def recheck(job_ids: list[uuid.UUID]) -> dict[str, dict[str, Any]]:
        with factory() as session:
            return {str(job.id): document_of(job) for job in get_finished_jobs(session, job_ids)}

    return recheck


def _install_rate_limit(app: Flask, settings: Settings) -> None:
    if not settings.rate_limit_enabled:
        return  # RATE_LIMIT=off: not even the limiter's per-request hooks
    limiter = Limiter(
        key_func=get_remote_address,
        app=app,
        storage_uri=settings.limiter_url,
        storage_options={
            "socket_connect_timeout": 1,
            "socket_timeout": 1,
            **redis_keepalive_options(settings),
        },
        strategy="fixed-window",
        default_limits=[],
        headers_enabled=False,
        # The limiter is a guard, not a dependency: with Redis down, requests pass.
        swallow_errors=True,
        # ...and after one failed round trip each process counts in memory, re-trying
        # Redis with back-off, so a frozen Redis does not cost every request a timeout.
        in_memory_fallback_enabled=True,
    )
    # One allowance per client address across every customer job POST (API.md, Access),
    # per user with AUTH_MODE=jwt (the access check has set the request's rate key).
    app.extensions["job_rate_limit"] = limiter.shared_limit(
        settings.rate_limit,
        scope="customer-jobs",
        key_func=_rate_key,
    )


def _rate_key() -> str:
    key: str | None = g.get("rate_key")
    return key if key is not None else get_remote_address()
