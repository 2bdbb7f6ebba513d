"""The production stack (docker-compose.yml) agrees with the worker's defaults and is valid Compose.

No Docker engine runs here: the file is checked by reading it, and (in the full tier) by
``docker-compose config -q`` (Debian's Compose v1), which .ci/run installs.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from outbox.settings import DEFAULT_SOCKUDO_URL, Settings
from outbox.sockudo import Config

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_v1_compatible(compose):
    assert "name" not in compose, "a top-level name: breaks Compose v1"
    assert str(compose["version"]).startswith("2.")
    assert set(compose["services"]) == {
        "postgres",
        "redis",
        "sockudo",
        "migrate",
        "worker",
        "web",
    }


def test_sockudo_app_matches_the_worker_default(compose):
    default = Config.from_url(DEFAULT_SOCKUDO_URL)
    env = compose["services"]["sockudo"]["environment"]
    assert env["SOCKUDO_DEFAULT_APP_ID"] == default.app_id
    assert env["SOCKUDO_DEFAULT_APP_KEY"] == default.key
    assert env["SOCKUDO_DEFAULT_APP_SECRET"] == default.secret
    assert f"{default.port}:6001" in compose["services"]["sockudo"]["ports"]
    assert compose["services"]["sockudo"]["image"] == "ghcr.io/sockudo/sockudo:5.0.1"


def test_worker_publishes_to_that_app_inside_the_stack(compose):
    default = Config.from_url(DEFAULT_SOCKUDO_URL)
    for service in ("worker", "migrate"):
        env = compose["services"][service]["environment"]
        assert env["OUTBOX_DATABASE_URL"].startswith("postgresql://")
        assert "@postgres:5432/" in env["OUTBOX_DATABASE_URL"]
    url = Config.from_url(compose["services"]["worker"]["environment"]["SOCKUDO_URL"])
    assert (url.app_id, url.key, url.secret) == (default.app_id, default.key, default.secret)
    assert (url.host, url.port) == ("sockudo", 6001)


def test_idempotency_window_outlives_the_retry_horizon(compose):
    env = compose["services"]["sockudo"]["environment"]
    assert env["CACHE_DRIVER"] == "redis"
    assert env["REDIS_URL"] == "redis://redis:6379"
    defaults = Settings()
    horizon = defaults.lease_seconds + defaults.backoff_max_seconds
    assert int(env["IDEMPOTENCY_TTL_SECONDS"]) >= horizon
    # Server-to-server traffic from one IP must not hit the default per-IP API limit.
    assert env["RATE_LIMITER_ENABLED"] == "false"


def test_sockudo_keeps_history_versions_presence_and_annotations_in_postgres(compose):
    env = compose["services"]["sockudo"]["environment"]
    for flag in (
        "HISTORY_ENABLED",
        "VERSIONED_MESSAGES_ENABLED",
        "PRESENCE_HISTORY_ENABLED",
        "ANNOTATIONS_ENABLED",
        "SOCKUDO_DEFAULT_APP_ANNOTATIONS_ENABLED",
    ):
        assert env[flag] == "true", flag
    # Not the memory driver: versions, op_ids and annotations must survive a restart.
    assert env["HISTORY_BACKEND"] == env["VERSIONED_MESSAGES_DRIVER"] == "postgres"
    postgres = compose["services"]["postgres"]["environment"]
    assert env["DATABASE_POSTGRES_HOST"] == "postgres"
    assert env["DATABASE_POSTGRES_PORT"] == "5432"  # Sockudo's default is MySQL's 3306
    assert env["DATABASE_POSTGRES_USERNAME"] == postgres["POSTGRES_USER"]
    assert env["DATABASE_POSTGRES_PASSWORD"] == postgres["POSTGRES_PASSWORD"]
    assert env["DATABASE_POSTGRES_DATABASE"] == postgres["POSTGRES_DB"]
    assert env["INSTANCE_PROCESS_ID"]
    depends = compose["services"]["sockudo"]["depends_on"]
    assert depends["postgres"]["condition"] == "service_healthy"


def test_start_order_and_healthchecks(compose):
    services = compose["services"]
    for name in ("postgres", "redis", "sockudo"):
        assert "healthcheck" in services[name], name
    assert "/up/app-id" in " ".join(services["sockudo"]["healthcheck"]["test"])
    worker_deps = services["worker"]["depends_on"]
    assert worker_deps["postgres"]["condition"] == "service_healthy"
    assert worker_deps["sockudo"]["condition"] == "service_healthy"
    assert worker_deps["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["command"] == ["outbox", "migrate"]
    assert services["worker"]["build"] == "."
    assert (ROOT / "Dockerfile").is_file()


def test_the_dashboard_service_needs_a_token_and_sees_only_the_database(compose):
    web = compose["services"]["web"]
    assert web["build"] == "." and web["profiles"] == ["web"]
    command = web["command"]
    assert command[:2] == ["outbox", "web"] and "--write" not in command  # read-only
    # Listening on every address inside the network: a token is required (from the environment).
    assert command[command.index("--host") + 1] == "0.0.0.0"
    env = web["environment"]
    assert set(env) == {"OUTBOX_DATABASE_URL", "OUTBOX_WEB_TOKEN"}  # no SOCKUDO_* at all
    assert (
        env["OUTBOX_DATABASE_URL"]
        == compose["services"]["worker"]["environment"]["OUTBOX_DATABASE_URL"]
    )
    assert env["OUTBOX_WEB_TOKEN"].startswith("${OUTBOX_WEB_TOKEN")
    port = command[command.index("--port") + 1]
    assert web["ports"] == [f"127.0.0.1:{port}:{port}"]  # the host's loopback only
    assert web["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert f"127.0.0.1:{port}/healthz" in " ".join(web["healthcheck"]["test"])
    assert 'pip install ".[web,metrics]"' in (ROOT / "Dockerfile").read_text()


def test_the_worker_serves_metrics_and_its_healthcheck_asks_readyz(compose):
    worker = compose["services"]["worker"]
    env = worker["environment"]
    # The shared settings (merged from x-outbox-env) and the metrics port, open to the network.
    assert (
        env["OUTBOX_DATABASE_URL"]
        == compose["services"]["migrate"]["environment"]["OUTBOX_DATABASE_URL"]
    )
    settings = Settings.from_env({k: str(v) for k, v in env.items()})
    assert settings.metrics_port == 9464 and settings.metrics_host == "0.0.0.0"
    probe = " ".join(worker["healthcheck"]["test"])
    assert f"http://127.0.0.1:{settings.metrics_port}/readyz" in probe
    assert "ports" not in worker  # scraped inside the network, not published on the host
    # The image has what the metrics port needs.
    assert "metrics" in (ROOT / "Dockerfile").read_text().split('pip install ".[')[1].split("]")[0]


@pytest.mark.package
def test_docker_compose_config_validates():
    tool = shutil.which("docker-compose")
    assert tool is not None, (
        "docker-compose (Debian's Compose v1) is not installed: .ci/run installs it"
    )
    result = subprocess.run(
        [tool, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
