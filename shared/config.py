"""Settings from the environment: the only module that reads ``os.environ``.

Every tunable of the system is a field here, named after its variable
(``DATABASE_URL`` -> ``database_url``) and converted once at load time.  Web,
workers and tools build one ``Settings`` per process with ``Settings.from_env()``;
tests construct ``Settings(...)`` directly.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit


class AppEnv(enum.StrEnum):
    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


class ConfigError(RuntimeError):
    """A variable is missing or malformed; the message names it."""


# Logical Redis databases, fixed so that flushing the cache can never drop a queue.
REDIS_DB_BROKER = 0  # Celery's queues, and each partition's wake flag beside its queue
REDIS_DB_CACHE = 1
REDIS_DB_LIMITER = 2
REDIS_DB_COORDINATION = 3  # coupon sold-out markers (job notifications are pub/sub)

# API.md: a finished job's document is kept at least 24 hours.
MIN_JOB_RETENTION_HOURS = 24

_RATE_LIMIT = re.compile(r"^\d+\s*(/|per)\s*\d*\s*(second|minute|hour|day)s?$", re.IGNORECASE)
_SECRET_FIELDS = frozenset({"admin_token", "flower_basic_auth", "auth_jwt_secret"})
# AUTH_MODE values; empty means not set (then none, except that production refuses it).
AUTH_MODES = ("none", "jwt")
# An HS256 secret shorter than the hash (RFC 7518 §3.2) can be brute-forced from one token.
MIN_JWT_SECRET_BYTES = 32
_BASIC_AUTH = re.compile(r"^[^:,]+:[^,]+(,[^:,]+:[^,]+)*$")
# honcho names its processes <type>.<n from 1> (HONCHO_PROCESS_NAME).
_HONCHO_NAME = re.compile(r"^[A-Za-z0-9_-]+\.(\d+)$")


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def redis_url_for(url: str, db: int) -> str:
    """The same Redis server as ``url``, on logical database ``db``."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{db}"))


@dataclass(frozen=True)
class Settings:
    database_url: str
    redis_url: str = "redis://127.0.0.1:6379/0"
    app_env: AppEnv = AppEnv.DEVELOPMENT
    admin_token: str = ""
    # Read replicas (streaming standbys of DATABASE_URL), comma-separated; the single
    # DATABASE_REPLICA_URL is an alias (both may be given: every URL counts once).
    database_replica_urls: str = ""
    database_replica_url: str | None = None
    # A replica serves a read only while it has replayed every commit older than this
    # (and the read's own bound: API.md's 1 s for listings); measured, not per request,
    # every REPLICA_CHECK_INTERVAL_MS.
    replica_max_lag_ms: int = 1000
    replica_check_interval_ms: int = 500

    # Queue partitioning and the worker's batching (ARCHITECTURE rules 1 and 6).
    partitions: int = 16
    batch_size: int = 200
    # Drains one worker process runs at once (a thread each).  A drain takes every
    # partition of its kind and goes on while it finds jobs, so one thread per partition
    # kind (user, product, coupon) lets no kind wait behind another's run of batches.
    worker_threads: int = 3
    # The history listener waits this long before a drain, so outbox rows arrive in batches.
    history_linger_ms: int = 200
    job_max_attempts: int = 3
    sweep_after_seconds: float = 5.0
    sweep_interval_seconds: float = 2.0
    visibility_timeout_seconds: int = 300
    task_time_limit_seconds: int = 120
    # Which partition worker this is (its Celery node name); every worker drains every partition.
    # Set by the run command's supervisor (0..K-1), or derived from honcho's
    # HONCHO_PROCESS_NAME (`honcho start -c worker=K`).
    worker_id: int = 0

    # HTTP edge.
    rate_limit: str = "200/second"
    max_wait_seconds: int = 30
    max_body_bytes: int = 64 * 1024

    # Data over time (README "Data over time"): a finished job's document is kept at
    # least this long after it finished (API.md: default 72, at least 24); delivered
    # outbox rows as long.  Fractions of an hour (the soak run's minutes) only outside
    # production.  Idempotency-Keys live exactly as long as their job.
    job_retention_hours: float = 72.0
    # Width of one time partition of ``jobs`` and ``outbox``: rows go away a partition
    # at a time, so storage holds at most retention + one width.  A day keeps the
    # partitions few (reads that cannot prune get slower with their number: README,
    # "Data over time").  Below an hour only outside production.
    job_partition_seconds: int = 24 * 3600

    # Product read cache (ARCHITECTURE rule 5).
    cache_ttl_seconds: int = 600

    # Orders: an unpaid order expires (FAILED, stock back) this long after its creation.
    order_payment_timeout_seconds: int = 900
    # The best-seller ranking is recomputed at most this often (API.md: at most 60 s old).
    top_sellers_cache_seconds: int = 30

    # Database session tuning.
    db_pool_size: int = 10
    db_connect_timeout_seconds: int = 2
    db_statement_timeout_ms: int = 15_000
    db_lock_timeout_ms: int = 5_000
    # Gray failures (README, "Operating it" -> "Frozen and cut-off processes").  The
    # server ends a session left idle inside a transaction this long (a frozen or
    # cut-off drainer), which releases its partition's lock and rows.
    db_idle_in_transaction_timeout_ms: int = 5_000
    # The longest a web request waits for one answer of PostgreSQL (a frozen server
    # never sends one, and its kernel still acknowledges: no TCP timer fires); the
    # connection is then dropped and the request answers 503.  Workers wait up to
    # DB_STATEMENT_TIMEOUT_MS plus this, so the server's own timeout fires first.
    db_client_timeout_ms: int = 5_000
    # TCP keepalives and TCP_USER_TIMEOUT on every PostgreSQL and Redis connection:
    # a peer behind a blackhole is given up after about idle + interval x count
    # seconds when idle, after TCP_USER_TIMEOUT_MS when data waits unacknowledged.
    tcp_keepalive_idle_seconds: int = 5
    tcp_keepalive_interval_seconds: int = 2
    tcp_keepalive_count: int = 3
    tcp_user_timeout_ms: int = 10_000

    # Fail-fast circuit breakers for the database and the broker.
    breaker_fail_max: int = 3
    breaker_reset_seconds: float = 5.0

    log_level: str = "INFO"
    # ``text`` (the run command's default) or ``json``: one JSON object per line from
    # every process (container platforms collect that), with the job id on every line
    # about a job.
    log_format: str = "text"
    # web's access log, one line per request: ``on``/``off``; empty follows LOG_FORMAT
    # (on with ``json``, off with ``text``, so ``make run`` prints what it always did).
    access_log: str = ""
    # Proxies in front of web whose X-Forwarded-For is believed (werkzeug's ProxyFix):
    # the client address (rate limit, access log) is taken that many hops back.  0: the
    # peer's address, and a forwarded header changes nothing (nobody can spoof one).
    trusted_proxy_hops: int = 0

    # Metrics (README, "Operating it" -> "Metrics").  With PROMETHEUS_MULTIPROC_DIR set
    # (the run command sets it) every process writes its metrics into that folder and
    # web's /metrics adds them all up; prometheus_client reads the variable itself too.
    prometheus_multiproc_dir: str = ""
    # When set, partition worker i also serves its own metrics on METRICS_PORT + i
    # (hosts that share no folder with web, e.g. containers).
    metrics_port: int = 0
    metrics_address: str = "127.0.0.1"

    # When set, beat touches this file each time it sends a due task (every second or
    # so): a container healthcheck tells a live beat from a hung one by its age.
    beat_heartbeat_file: str = ""

    # Flower's HTTP basic auth, ``user:password`` (comma-separated for several).
    flower_basic_auth: str = ""

    # Customer identity (API.md, Access): ``none`` trusts the userId a client names (a
    # gateway in front checked it); ``jwt`` takes the user from a verified bearer JWT.
    # Left empty it means none, which APP_ENV=production refuses: an operator must choose.
    auth_mode: str = ""
    # One key source for jwt: an HS256 secret, a PEM public key (RS256 / ES256; the PEM
    # text or a path to a PEM file), or a JWKS URL (keys chosen by the token's kid).
    auth_jwt_secret: str = ""
    auth_jwt_public_key: str = ""
    auth_jwks_url: str = ""
    # Checked when set: the token's iss and aud must match.
    auth_jwt_issuer: str = ""
    auth_jwt_audience: str = ""
    # Clock skew allowed on exp, nbf and iat.
    auth_leeway_seconds: int = 30
    # A token whose scope / scp holds this may make the admin calls.
    auth_admin_scope: str = "shop:admin"

    def __post_init__(self) -> None:
        if not self.database_url:
            raise ConfigError("DATABASE_URL is required")
        if self.partitions < 1:
            raise ConfigError("PARTITIONS must be at least 1")
        if self.worker_threads < 1:
            raise ConfigError("WORKER_THREADS must be at least 1")
        if self.worker_id < 0:
            raise ConfigError("WORKER_ID must not be negative")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError("METRICS_PORT must be a port number (0: off)")
        self._check_edge()
        self._check_timeouts()
        if self.batch_size < 1:
            raise ConfigError("BATCH_SIZE must be at least 1")
        if self.order_payment_timeout_seconds < 1:
            raise ConfigError("ORDER_PAYMENT_TIMEOUT_SECONDS must be at least 1")
        if not 1 <= self.top_sellers_cache_seconds <= 60:
            raise ConfigError("TOP_SELLERS_CACHE_SECONDS must be in 1..60")
        self._check_retention()
        self._check_replicas()
        if self.rate_limit.lower() != "off" and not _RATE_LIMIT.match(self.rate_limit):
            raise ConfigError(
                f"RATE_LIMIT must look like '200/second' or 'off', not {self.rate_limit!r}"
            )
        if self.app_env is AppEnv.PRODUCTION and not self.admin_token:
            raise ConfigError("ADMIN_TOKEN is required when APP_ENV=production")
        if self.flower_basic_auth and not _BASIC_AUTH.match(self.flower_basic_auth):
            raise ConfigError("FLOWER_BASIC_AUTH must look like 'user:password'")
        self._check_auth()

    def _check_auth(self) -> None:
        if self.auth_mode not in ("", *AUTH_MODES):
            raise ConfigError(f"AUTH_MODE must be none or jwt, not {self.auth_mode!r}")
        if self.app_env is AppEnv.PRODUCTION and not self.auth_mode:
            raise ConfigError(
                "AUTH_MODE is required when APP_ENV=production (jwt, or none behind a gateway"
                " that checks who may act as a userId)"
            )
        if not 0 <= self.auth_leeway_seconds <= 300:
            raise ConfigError("AUTH_LEEWAY_SECONDS must be in 0..300")
        if not self.auth_admin_scope.strip() or " " in self.auth_admin_scope.strip():
            raise ConfigError("AUTH_ADMIN_SCOPE must be one scope (no spaces)")
        if not self.jwt_auth:
            return
        sources = [
            name
            for name, value in (
                ("AUTH_JWT_SECRET", self.auth_jwt_secret),
                ("AUTH_JWT_PUBLIC_KEY", self.auth_jwt_public_key),
                ("AUTH_JWKS_URL", self.auth_jwks_url),
            )
            if value
        ]
        if len(sources) != 1:
            raise ConfigError(
                "AUTH_MODE=jwt needs exactly one of AUTH_JWT_SECRET, AUTH_JWT_PUBLIC_KEY,"
                f" AUTH_JWKS_URL (given: {', '.join(sources) or 'none'})"
            )
        if self.auth_jwt_secret and len(self.auth_jwt_secret.encode()) < MIN_JWT_SECRET_BYTES:
            raise ConfigError(f"AUTH_JWT_SECRET must be at least {MIN_JWT_SECRET_BYTES} bytes")
        if self.auth_jwks_url and not self.auth_jwks_url.startswith(("https://", "http://")):
            raise ConfigError("AUTH_JWKS_URL must be an http(s) URL")

    def _check_edge(self) -> None:
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"LOG_FORMAT must be 'text' or 'json', not {self.log_format!r}")
        if self.access_log not in ("", "on", "off"):
            raise ConfigError(f"ACCESS_LOG must be 'on' or 'off', not {self.access_log!r}")
        if not 0 <= self.trusted_proxy_hops <= 10:
            raise ConfigError("TRUSTED_PROXY_HOPS must be in 0..10")

    def _check_timeouts(self) -> None:
        if self.db_idle_in_transaction_timeout_ms < 0:
            raise ConfigError("DB_IDLE_IN_TRANSACTION_TIMEOUT_MS must not be negative (0: off)")
        if self.db_client_timeout_ms < 100:
            raise ConfigError("DB_CLIENT_TIMEOUT_MS must be at least 100")
        if min(self.tcp_keepalive_idle_seconds, self.tcp_keepalive_interval_seconds) < 1:
            raise ConfigError("TCP_KEEPALIVE_IDLE_SECONDS and _INTERVAL_SECONDS must be >= 1")
        if self.tcp_keepalive_count < 1:
            raise ConfigError("TCP_KEEPALIVE_COUNT must be at least 1")
        if self.tcp_user_timeout_ms < 0:
            raise ConfigError("TCP_USER_TIMEOUT_MS must not be negative (0: the OS default)")

    def _check_retention(self) -> None:
        production = self.app_env is AppEnv.PRODUCTION
        if not self.job_retention_hours > 0:
            raise ConfigError("JOB_RETENTION_HOURS must be positive")
        if production and self.job_retention_hours < MIN_JOB_RETENTION_HOURS:
            raise ConfigError(
                f"JOB_RETENTION_HOURS must be at least {MIN_JOB_RETENTION_HOURS} (API.md)"
                " when APP_ENV=production"
            )
        if self.job_partition_seconds < 10:
            raise ConfigError("JOB_PARTITION_SECONDS must be at least 10")
        if production and self.job_partition_seconds < 3600:
            raise ConfigError("JOB_PARTITION_SECONDS must be at least 3600 when APP_ENV=production")

    @property
    def job_retention(self) -> dt.timedelta:
        return dt.timedelta(hours=self.job_retention_hours)

    def _check_replicas(self) -> None:
        if self.replica_max_lag_ms < 0:
            raise ConfigError("REPLICA_MAX_LAG_MS must not be negative")
        if not 50 <= self.replica_check_interval_ms <= 60_000:
            raise ConfigError("REPLICA_CHECK_INTERVAL_MS must be in 50..60000")
        for url in self.replica_urls:
            if "://" not in url:
                raise ConfigError(f"DATABASE_REPLICA_URLS holds {_redact_url(url)!r}, not a URL")

    def check_flower(self) -> None:
        """Flower may run: ``FLOWER_BASIC_AUTH`` is set when ``APP_ENV=production``.

        Checked by Flower's launcher only, so that web and workers do not need (or
        see) Flower's password.
        """
        if self.app_env is AppEnv.PRODUCTION and not self.flower_basic_auth:
            raise ConfigError("FLOWER_BASIC_AUTH is required when APP_ENV=production")

    def __repr__(self) -> str:
        shown = []
        for f in dataclasses.fields(self):
            if not f.repr:
                continue
            value = getattr(self, f.name)
            if f.name in _SECRET_FIELDS and value:
                value = "***"
            elif isinstance(value, str) and "://" in value:
                value = ",".join(_redact_url(part) for part in value.split(","))
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    @property
    def access_log_enabled(self) -> bool:
        if self.access_log:
            return self.access_log == "on"
        return self.log_format == "json"

    @property
    def jwt_auth(self) -> bool:
        """AUTH_MODE=jwt: customer calls carry a verified bearer JWT (API.md, Access)."""
        return self.auth_mode == "jwt"

    @property
    def rate_limit_enabled(self) -> bool:
        return self.rate_limit.lower() != "off"

    @property
    def replica_urls(self) -> list[str]:
        """Every replica URL of DATABASE_REPLICA_URLS and DATABASE_REPLICA_URL, once each."""
        given = [u.strip() for u in self.database_replica_urls.split(",")]
        given.append((self.database_replica_url or "").strip())
        return list(dict.fromkeys(u for u in given if u))

    @property
    def sqlalchemy_url(self) -> str:
        return to_sqlalchemy_url(self.database_url)

    @property
    def broker_url(self) -> str:
        return redis_url_for(self.redis_url, REDIS_DB_BROKER)

    @property
    def cache_url(self) -> str:
        return redis_url_for(self.redis_url, REDIS_DB_CACHE)

    @property
    def limiter_url(self) -> str:
        return redis_url_for(self.redis_url, REDIS_DB_LIMITER)

    @property
    def coordination_url(self) -> str:
        return redis_url_for(self.redis_url, REDIS_DB_COORDINATION)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        if not env.get("DATABASE_URL"):
            raise ConfigError(
                "DATABASE_URL is required (make run starts an embedded PostgreSQL and sets it)"
            )
        kwargs: dict[str, object] = {"database_url": env["DATABASE_URL"]}
        for f in dataclasses.fields(cls):
            if f.name == "database_url":
                continue
            name = f.name.upper()
            if name not in env or env[name] == "":
                continue
            kwargs[f.name] = _convert(name, f.type, env[name])
        honcho = _HONCHO_NAME.match(env.get("HONCHO_PROCESS_NAME", ""))
        if "worker_id" not in kwargs and honcho:
            kwargs["worker_id"] = int(honcho.group(1)) - 1  # `honcho start -c worker=K`
        return cls(**kwargs)  # type: ignore[arg-type]  # fields checked one by one above


def _convert(name: str, type_name: object, raw: str) -> object:
    text = str(type_name)
    try:
        if text == "int":
            return int(raw)
        if text == "float":
            return float(raw)
        if text == "AppEnv":
            return AppEnv(raw.lower())
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not a valid {text}") from exc
    return raw


def to_sqlalchemy_url(url: str) -> str:
    """``postgresql://`` (what libpq tools take) -> the psycopg 3 dialect SQLAlchemy needs."""
    for prefix in ("postgresql+psycopg2://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url
