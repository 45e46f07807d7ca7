"""Settings from the environment: conversions, refusals that name the variable, masking."""

from __future__ import annotations

import pytest

from shared.config import AppEnv, ConfigError, Settings

URL = "postgresql://shop:pg-secret@db.example:5432/shop"


def test_from_env_converts_each_field() -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL": URL,
            "REDIS_URL": "redis://cache.example:6380/0",
            "APP_ENV": "TEST",
            "PARTITIONS": "8",
            "BATCH_SIZE": "50",
            "JOB_MAX_ATTEMPTS": "5",
            "SWEEP_AFTER_SECONDS": "2.5",
            "WORKER_ID": "1",
            "WORKER_THREADS": "4",
            "RATE_LIMIT": "100 per minute",
            "LOG_LEVEL": "DEBUG",
            "ORDER_PAYMENT_TIMEOUT_SECONDS": "60",
            "TOP_SELLERS_CACHE_SECONDS": "5",
            "UNRELATED": "ignored",
        }
    )
    assert settings.database_url == URL
    assert settings.app_env is AppEnv.TEST
    assert (settings.partitions, settings.batch_size, settings.job_max_attempts) == (8, 50, 5)
    assert settings.sweep_after_seconds == 2.5
    assert isinstance(settings.sweep_after_seconds, float)
    assert (settings.worker_id, settings.worker_threads) == (1, 4)
    assert settings.rate_limit == "100 per minute"
    assert settings.rate_limit_enabled
    assert settings.log_level == "DEBUG"
    assert (settings.order_payment_timeout_seconds, settings.top_sellers_cache_seconds) == (60, 5)


def test_empty_variables_keep_the_defaults() -> None:
    settings = Settings.from_env({"DATABASE_URL": URL, "PARTITIONS": "", "RATE_LIMIT": ""})
    assert settings.partitions == Settings(database_url=URL).partitions
    assert settings.rate_limit == "200/second"
    assert settings.app_env is AppEnv.DEVELOPMENT
    assert settings.order_payment_timeout_seconds == 900  # API.md's default
    assert settings.top_sellers_cache_seconds <= 60  # API.md: generatedAt at most 60 s ago


def test_derived_urls() -> None:
    settings = Settings.from_env({"DATABASE_URL": URL, "REDIS_URL": "redis://r.example:7000/0"})
    assert settings.sqlalchemy_url == "postgresql+psycopg://shop:pg-secret@db.example:5432/shop"
    assert settings.broker_url == "redis://r.example:7000/0"
    assert settings.cache_url == "redis://r.example:7000/1"
    assert settings.limiter_url == "redis://r.example:7000/2"
    assert settings.coordination_url == "redis://r.example:7000/3"


@pytest.mark.parametrize("environ", [{}, {"DATABASE_URL": ""}])
def test_missing_database_url_is_named(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        Settings.from_env(environ)


@pytest.mark.parametrize(
    ("name", "raw"),
    [("PARTITIONS", "many"), ("SWEEP_AFTER_SECONDS", "soon"), ("APP_ENV", "staging")],
)
def test_malformed_values_are_refused_by_name(name: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({"DATABASE_URL": URL, name: raw})


@pytest.mark.parametrize("limit", ["fast", "200", "200/fortnight", "/second", "-5/second"])
def test_bad_rate_limit_is_refused(limit: str) -> None:
    with pytest.raises(ConfigError, match="RATE_LIMIT"):
        Settings.from_env({"DATABASE_URL": URL, "RATE_LIMIT": limit})


@pytest.mark.parametrize("limit", ["200/second", "10/minute", "5 per hour", "1/days", "OFF"])
def test_good_rate_limits_are_taken(limit: str) -> None:
    settings = Settings.from_env({"DATABASE_URL": URL, "RATE_LIMIT": limit})
    assert settings.rate_limit == limit
    assert settings.rate_limit_enabled is (limit != "OFF")


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"PARTITIONS": "0"}, "PARTITIONS"),
        ({"BATCH_SIZE": "0"}, "BATCH_SIZE"),
        ({"WORKER_THREADS": "0"}, "WORKER_THREADS"),
        ({"WORKER_ID": "-1"}, "WORKER_ID"),
        ({"APP_ENV": "production"}, "ADMIN_TOKEN"),
        ({"ORDER_PAYMENT_TIMEOUT_SECONDS": "0"}, "ORDER_PAYMENT_TIMEOUT_SECONDS"),
        ({"TOP_SELLERS_CACHE_SECONDS": "61"}, "TOP_SELLERS_CACHE_SECONDS"),
        ({"TOP_SELLERS_CACHE_SECONDS": "0"}, "TOP_SELLERS_CACHE_SECONDS"),
        ({"REPLICA_MAX_LAG_MS": "-1"}, "REPLICA_MAX_LAG_MS"),
        ({"REPLICA_CHECK_INTERVAL_MS": "10"}, "REPLICA_CHECK_INTERVAL_MS"),
        ({"DATABASE_REPLICA_URLS": "postgresql://a/shop,replica-b"}, "DATABASE_REPLICA_URLS"),
    ],
)
def test_inconsistent_settings_are_refused(environ: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Settings.from_env({"DATABASE_URL": URL, **environ})


def test_production_with_a_token_is_fine() -> None:
    settings = Settings.from_env({"DATABASE_URL": URL, "APP_ENV": "production", "ADMIN_TOKEN": "t"})
    assert settings.app_env is AppEnv.PRODUCTION


def test_replica_urls_come_from_the_list_and_its_alias_once_each() -> None:
    a, b = "postgresql://ro@replica-a/shop", "postgresql://ro@replica-b/shop"
    assert Settings.from_env({"DATABASE_URL": URL}).replica_urls == []
    assert Settings.from_env({"DATABASE_URL": URL, "DATABASE_REPLICA_URL": a}).replica_urls == [a]
    listed = Settings.from_env(
        {"DATABASE_URL": URL, "DATABASE_REPLICA_URLS": f" {a}, {b} ,", "DATABASE_REPLICA_URL": a}
    )
    assert listed.replica_urls == [a, b]
    assert (listed.replica_max_lag_ms, listed.replica_check_interval_ms) == (1000, 500)


def test_repr_masks_the_token_and_url_passwords() -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL": URL,
            "DATABASE_REPLICA_URL": "postgresql://ro:replica-secret@replica.example/shop",
            "DATABASE_REPLICA_URLS": "postgresql://ro:s3cret-a@ra.example/shop,"
            "postgresql://ro:s3cret-b@rb.example/shop",
            "REDIS_URL": "redis://:redis-secret@r.example:6379/0",
            "ADMIN_TOKEN": "admin-secret-token",
        }
    )
    shown = repr(settings)
    secrets = (
        "pg-secret",
        "replica-secret",
        "s3cret-a",
        "s3cret-b",
        "redis-secret",
        "admin-secret",
    )
    for secret in secrets:
        assert secret not in shown
    assert "admin_token='***'" in shown
    assert "shop:***@db.example:5432" in shown
    assert "ro:***@replica.example" in shown
    assert "ro:***@ra.example/shop,postgresql://ro:***@rb.example" in shown
    assert ":***@r.example:6379" in shown
    assert str(settings) == shown
    # Masking is display only.
    assert settings.admin_token == "admin-secret-token"
    assert settings.database_url == URL


@pytest.mark.parametrize(
    ("environ", "worker_id"),
    [
        ({}, 0),
        ({"WORKER_ID": "2"}, 2),  # the run command's supervisor
        ({"HONCHO_PROCESS_NAME": "worker.3"}, 2),  # `honcho start -c worker=3`, third one
        ({"HONCHO_PROCESS_NAME": "worker.3", "WORKER_ID": "0"}, 0),
        ({"HONCHO_PROCESS_NAME": "worker"}, 0),
    ],
)
def test_worker_id_comes_from_the_supervisor_or_honcho(
    environ: dict[str, str], worker_id: int
) -> None:
    assert Settings.from_env({"DATABASE_URL": URL, **environ}).worker_id == worker_id


def test_a_negative_worker_id_is_refused() -> None:
    with pytest.raises(ConfigError, match="WORKER_ID"):
        Settings.from_env({"DATABASE_URL": URL, "WORKER_ID": "-1"})


@pytest.mark.parametrize("auth", ["nocolon", ":pw", "user:", "a:b,", "a:b,c"])
def test_malformed_flower_basic_auth_is_refused(auth: str) -> None:
    with pytest.raises(ConfigError, match="FLOWER_BASIC_AUTH"):
        Settings.from_env({"DATABASE_URL": URL, "FLOWER_BASIC_AUTH": auth})


def test_flower_needs_basic_auth_in_production_only() -> None:
    production = {"DATABASE_URL": URL, "APP_ENV": "production", "ADMIN_TOKEN": "t"}
    with pytest.raises(ConfigError, match="FLOWER_BASIC_AUTH is required"):
        Settings.from_env(production).check_flower()
    Settings.from_env({"DATABASE_URL": URL}).check_flower()
    settings = Settings.from_env(production | {"FLOWER_BASIC_AUTH": "ops:s3cret:x,two:pw"})
    settings.check_flower()
    assert "s3cret" not in repr(settings)
    assert "flower_basic_auth='***'" in repr(settings)
