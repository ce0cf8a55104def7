"""No silent fallbacks: a process without DATABASE_URL (or REDIS_URL on the Redis broker) exits at once naming
the variable and starts no server of its own; FLEET_EMBEDDED=1 asks for the embedded one; `fleet status` and
the exporter's /readyz say which database and broker a process uses, credentials masked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import psycopg
import pytest

from fleet.shared.services import EmbeddedPostgres, free_port

from .helpers import ROOT, fleet_cli, wait_for

UNSET = ("DATABASE_URL", "REDIS_URL", "FLEET_EMBEDDED", "FLEET_BROKER", "PROMETHEUS_MULTIPROC_DIR")


def bare_env(home, **extra) -> dict:
    """The test run's environment without any database or Redis setting, with a FLEET_HOME of its own."""
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    return env | {"FLEET_HOME": str(home), "ZUPLO_BASE_URL": "https://billing.example.test"} | extra


@pytest.mark.parametrize(
    "command",
    [
        ["worker", "--queues", "echo"],
        ["scheduler"],
        ["enqueue", "echo", "{}"],
        ["status"],
        ["migrate"],
        ["dlq", "list"],
        ["metrics"],
        ["gateway"],
    ],
)
def test_a_process_without_database_url_exits_naming_it_and_starts_no_postgres(tmp_path, command):
    home = tmp_path / "home"
    out = fleet_cli(*command, env=bare_env(home), check=False)
    assert out.returncode == 2, out.stderr
    assert f"fleet {command[0]}: DATABASE_URL is not set" in out.stderr and "FLEET_EMBEDDED=1" in out.stderr
    assert not (home / "pg").exists()


def test_a_worker_started_by_dramatiq_itself_without_database_url_fails_naming_it(tmp_path):
    home = tmp_path / "home"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dramatiq",
            "fleet.workers:start",
            "--processes",
            "1",
            "--threads",
            "1",
            "--queues",
            "echo",
        ],
        env=bare_env(home),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "DATABASE_URL is not set" in proc.stderr
    assert not (home / "pg").exists()


def test_the_redis_broker_without_redis_url_exits_naming_it(services, tmp_path):
    home = tmp_path / "home"
    env = bare_env(home, DATABASE_URL=services["dsn"], FLEET_BROKER="redis")
    for command in (["worker", "--queues", "echo"], ["scheduler"], ["status"]):
        out = fleet_cli(*command, env=env, check=False)
        assert out.returncode == 2 and f"fleet {command[0]}: REDIS_URL is not set" in out.stderr, out.stderr
        assert "DATABASE_URL is not set" not in out.stderr
    assert not (home / "redis").exists()


def test_fleet_embedded_asks_for_the_embedded_postgres(tmp_path):
    home = tmp_path / "home"
    try:
        out = fleet_cli("migrate", env=bare_env(home, FLEET_EMBEDDED="1"))
        assert "applied" in out.stdout and EmbeddedPostgres(home).running()
        status = json.loads(fleet_cli("status", "--json", env=bare_env(home, FLEET_EMBEDDED="1")).stdout)
        assert status["database"] == f"embedded under {home}" and status["broker"] == "pgmq"
    finally:
        EmbeddedPostgres(home).down()


def test_status_and_readyz_name_the_database_and_broker_with_credentials_masked(services, tmp_path):
    password = psycopg.conninfo.conninfo_to_dict(services["dsn"])["password"]
    port = psycopg.conninfo.conninfo_to_dict(services["dsn"])["port"]
    env = bare_env(
        tmp_path / "home", DATABASE_URL=services["dsn"], REDIS_URL=services["redis_url"], FLEET_BROKER="redis"
    )
    status = json.loads(fleet_cli("status", "--json", env=env).stdout)
    assert status["database"] == f"postgresql://postgres:***@127.0.0.1:{port}/fleet"
    assert status["broker"] == "redis" and status["redis"].startswith("redis://:***@127.0.0.1:")
    table = fleet_cli("status", env=env).stdout
    assert f"database: postgresql://postgres:***@127.0.0.1:{port}/fleet" in table and "broker: redis" in table
    assert password not in table

    metrics_port = free_port()
    mdir = tmp_path / "metrics"
    mdir.mkdir()
    exporter = subprocess.Popen(
        [sys.executable, "-m", "fleet.ops.cli", "metrics", "--port", str(metrics_port)],
        env=env | {"PROMETHEUS_MULTIPROC_DIR": str(mdir)},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def ready():
            try:
                answer = httpx.get(f"http://127.0.0.1:{metrics_port}/readyz", timeout=2)
            except httpx.TransportError:
                return None
            return answer if answer.status_code == 200 else None

        lines = wait_for(ready, 30, 0.2, what="the exporter's /readyz").text.splitlines()
        assert lines[0] == "ready"
        assert f"database: postgresql://postgres:***@127.0.0.1:{port}/fleet" in lines and "broker: redis" in lines
        assert any(line.startswith("redis: redis://:***@127.0.0.1:") for line in lines)
        assert password not in "\n".join(lines)
    finally:
        exporter.terminate()
        exporter.wait(15)
