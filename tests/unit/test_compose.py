"""docker-compose.yml and the Dockerfile, read as data: the properties a deployment relies on.

No container engine is needed for these (``make deploy-check`` runs the file for real).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.config import Settings
from workers.boot import worker_arguments

ROOT = Path(__file__).resolve().parent.parent.parent
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
OFFICIAL = {"postgres:16", "redis:7"}
# The Prometheus project's own image, in an opt-in profile.
OPTIONAL = {"prometheus": re.compile(r"^prom/prometheus:v\d+\.\d+\.\d+$")}
APP = ("web", "worker", "history", "beat", "flower")  # the long-running processes of the image
REQUIRED = re.compile(r"^\$\{(?P<name>[A-Z_]+):\?[^}]+\}$")


def _long_running() -> list[str]:
    return [name for name in SERVICES if name != "migrate"]


def test_every_image_is_official_or_built_from_this_repository() -> None:
    for name, service in SERVICES.items():
        if "build" in service:
            assert service["build"]["context"] == ".", name
            continue
        image = service["image"]
        assert "bitnami" not in image
        if name in OPTIONAL:
            assert OPTIONAL[name].match(image), image
            assert service.get("profiles"), f"{name} is opt-in"
        else:
            assert image in OFFICIAL, f"{name}: {image}"


def test_the_image_is_official_python_multi_stage_non_root_and_pinned() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in dockerfile
    assert len(re.findall(r"^FROM \$\{PYTHON_IMAGE\}", dockerfile, re.M)) == 2
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users
    assert users[-1] not in ("root", "0")
    assert dockerfile.count("-c .ci/constraints.txt") == 2
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".run", ".git"} <= set(ignored)


def test_every_long_running_service_has_a_healthcheck_and_restarts() -> None:
    for name in _long_running():
        service = SERVICES[name]
        assert service.get("restart") == "unless-stopped", name
        check = service.get("healthcheck", {}).get("test")
        assert isinstance(check, list), name
        assert check[0] in ("CMD", "CMD-SHELL"), name
    assert SERVICES["web"]["healthcheck"]["test"][-1].count("/readyz") == 1
    for name, node in (("worker", "partitions"), ("history", "history@")):
        assert "inspect ping" in SERVICES[name]["healthcheck"]["test"][-1]
        assert node in SERVICES[name]["healthcheck"]["test"][-1]
    assert "/tmp/beat-heartbeat" in SERVICES["beat"]["healthcheck"]["test"][-1]
    assert SERVICES["beat"]["environment"]["BEAT_HEARTBEAT_FILE"] == "/tmp/beat-heartbeat"
    assert "FLOWER_BASIC_AUTH" in SERVICES["flower"]["healthcheck"]["test"][-1]


def test_the_migration_runs_once_before_every_process_of_the_image() -> None:
    migrate = SERVICES["migrate"]
    assert migrate["command"] == ["alembic", "upgrade", "head"]
    assert migrate["restart"] == "no"
    assert "migrate" not in migrate["depends_on"]
    for name in APP:
        assert SERVICES[name]["depends_on"]["migrate"] == {
            "condition": "service_completed_successfully"
        }, name


def test_secrets_come_from_the_environment_with_no_default() -> None:
    for name in (*APP, "migrate"):
        value = SERVICES[name]["environment"]["ADMIN_TOKEN"]
        match = REQUIRED.match(value)
        assert match, value
        assert match["name"] == "ADMIN_TOKEN"
    flower = REQUIRED.match(SERVICES["flower"]["environment"]["FLOWER_BASIC_AUTH"])
    assert flower
    assert flower["name"] == "FLOWER_BASIC_AUTH"


@pytest.mark.parametrize("name", [*APP, "migrate"])
def test_the_processes_run_in_production_with_json_logs(name: str) -> None:
    env = SERVICES[name]["environment"]
    assert env["APP_ENV"] == "production"
    assert env["LOG_FORMAT"] == "json"
    assert env["AUTH_MODE"] == "${AUTH_MODE:-none}"  # explicit, as production asks
    assert "postgres-replica" in env["DATABASE_REPLICA_URLS"]


def test_metrics_of_every_process_are_reachable() -> None:
    assert SERVICES["web"]["environment"]["PROMETHEUS_MULTIPROC_DIR"]
    assert any(
        entry.startswith(SERVICES["web"]["environment"]["PROMETHEUS_MULTIPROC_DIR"])
        for entry in SERVICES["web"]["tmpfs"]
    )
    worker_env = SERVICES["worker"]["environment"]
    assert int(worker_env["METRICS_PORT"]) > 0
    assert worker_env["METRICS_ADDRESS"] == "0.0.0.0"  # inside its container
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    assert jobs["worker"]["dns_sd_configs"][0]["names"] == ["worker"]
    assert jobs["worker"]["dns_sd_configs"][0]["port"] == int(worker_env["METRICS_PORT"])
    assert jobs["web"]["dns_sd_configs"][0]["names"] == ["web"]


def test_workers_scale_with_distinct_node_names() -> None:
    worker = SERVICES["worker"]
    # No fixed name, host port or hostname: `--scale worker=N` makes N containers,
    # each its own hostname, and the node name carries the hostname.
    assert not {"container_name", "ports", "hostname"} & set(worker)
    assert worker["command"][:3] == ["python", "-m", "workers.boot"]
    arguments = worker_arguments(Settings(database_url="postgresql://x/y"))
    assert "--hostname=partitions0@%h" in arguments
    assert not {"container_name", "hostname"} & set(SERVICES["beat"])


def test_the_replicas_stream_from_the_primary_through_the_entrypoint_script() -> None:
    primary = SERVICES["postgres"]
    assert "hba_file=/etc/shop/pg_hba.conf" in primary["command"]
    hba = (ROOT / "deploy" / "postgres" / "pg_hba.conf").read_text()
    assert re.search(r"^host\s+replication\s+all\s+all\s+scram-sha-256$", hba, re.M)
    script = (ROOT / "deploy" / "postgres" / "replica-entrypoint.sh").read_text()
    assert re.search(r"pg_basebackup .*\n?.*-R", script)
    for name in ("postgres-replica", "postgres-replica-2"):
        replica = SERVICES[name]
        assert replica["image"] == "postgres:16"
        assert replica["entrypoint"][-1] == "/etc/shop/replica-entrypoint.sh"
        mounts = [v.split(":") for v in replica["volumes"]]
        assert [
            "./deploy/postgres/replica-entrypoint.sh",
            "/etc/shop/replica-entrypoint.sh",
            "ro",
        ] in mounts
        assert replica["depends_on"]["postgres"] == {"condition": "service_healthy"}
    volumes = {SERVICES[n]["volumes"][-1] for n in ("postgres-replica", "postgres-replica-2")}
    assert len(volumes) == 2  # each replica its own data
    assert SERVICES["redis"]["command"] == ["redis-server", "--appendonly", "yes"]
