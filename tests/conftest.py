"""Real services for the whole run: an embedded PostgreSQL (pgvector, pgmq) and a Redis, started
here and stopped at the end; worker processes are real `dramatiq` processes."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fleet.shared.config import Settings, reset_settings

from .helpers import WorkerGroup, events, wait_for

WORKER_ENV = {
    "FLEET_VISIBILITY_TIMEOUT_S": "4",
    "FLEET_MAX_RETRIES": "2",
    "FLEET_REDIS_MAINTENANCE_CHANCE": "1000000",
    "FLEET_POLL_INTERVAL_MS": "200",
    "FLEET_LOG_LEVEL": "INFO",
    "ZUPLO_BASE_URL": "https://billing.example.test",
}


@pytest.fixture(scope="session")
def services():
    home = Path(tempfile.mkdtemp(prefix="fleet-test-"))
    os.environ["FLEET_HOME"] = str(home)
    for var in ("DATABASE_URL", "REDIS_URL", "FLEET_BROKER", "FLEET_SIGNING_KEY", "PROMETHEUS_MULTIPROC_DIR"):
        os.environ.pop(var, None)
    reset_settings()
    from fleet.shared.db import close_pool, connect
    from fleet.shared.migrate import migrate
    from fleet.shared.services import EmbeddedPostgres, EmbeddedRedis

    pg, rd = EmbeddedPostgres(home), EmbeddedRedis(home)
    try:
        dsn = pg.up()
        redis_url = rd.up()
        os.environ["DATABASE_URL"] = dsn
        os.environ["REDIS_URL"] = redis_url
        os.environ["FLEET_DB_POOLER"] = "false"
        reset_settings()
        with connect() as conn:
            migrate(conn)
        yield {"dsn": dsn, "redis_url": redis_url, "home": home}
    finally:
        from fleet.shared import events

        events.flush_quietly()  # before the database goes: the exit-time flush would wait 30 s for it
        close_pool()
        rd.down()
        pg.down()
        shutil.rmtree(home, ignore_errors=True)


@dataclass
class Fleet:
    kind: str
    dsn: str = field(repr=False)  # holds the password
    env: dict = field(repr=False)
    workers: WorkerGroup
    client: object
    log_dir: Path

    def __repr__(self) -> str:
        return f"Fleet({self.kind})"

    def _repr_pretty_(self, printer, cycle) -> None:  # hypothesis prints fixtures with this
        printer.text(repr(self))

    def trace(self) -> str:
        return str(uuid.uuid4())

    def wait_done(self, trace_id: str, count: int, timeout: float = 30) -> list[dict]:
        def finished():
            evs = events(self.dsn, trace_id=trace_id)
            done = {e["job_id"] for e in evs if e["type"] in ("job.succeeded", "job.dead")}
            return evs if len(done) >= count else None

        return wait_for(finished, timeout, what=f"{count} job(s) of trace {trace_id} to finish")


def make_client(kind: str, **settings):
    from fleet.shared.brokers import build_broker
    from fleet.shared.client import FleetClient

    settings = Settings(FLEET_BROKER=kind, **settings)
    return FleetClient(build_broker(settings), settings)


def worker_env(services, kind: str, **extra) -> dict:
    env = dict(os.environ)
    env.update(WORKER_ENV)
    env["FLEET_BROKER"] = kind
    env.update(extra)
    return env


@contextmanager
def started_fleet(services, kind: str, log_dir: Path, **extra_env):
    env = worker_env(services, kind, **extra_env)
    group = WorkerGroup(env, processes=1, threads=4, metrics=True, log_dir=log_dir).start()
    signing = {"FLEET_SIGNING_KEY": extra_env["FLEET_SIGNING_KEY"]} if "FLEET_SIGNING_KEY" in extra_env else {}
    client = make_client(kind, **signing)
    f = Fleet(kind, services["dsn"], env, group, client, log_dir)
    try:
        probe = f.trace()
        client.enqueue("echo", {"message": "probe"}, trace_id=probe)
        f.wait_done(probe, 1, timeout=60)
        yield f
    finally:
        code = group.terminate()
        client.broker.close()
        assert code == 0, f"workers exited with {code}:\n{group.logs()[-3000:]}"


@pytest.fixture(scope="module", params=["pgmq", "redis"])
def fleet(request, services, tmp_path_factory):
    """Worker processes on each broker in turn: the contract suite runs once per broker."""
    with started_fleet(services, request.param, tmp_path_factory.mktemp(f"workers-{request.param}")) as f:
        yield f


@pytest.fixture(scope="module")
def pgmq_fleet(services, tmp_path_factory):
    with started_fleet(services, "pgmq", tmp_path_factory.mktemp("workers-pgmq")) as f:
        yield f


@pytest.fixture(scope="module")
def sim():
    """The provider simulator on loopback, in this process; workers reach it over real HTTP."""
    from fleet.simulator import SimConfig, SimulatorServer

    from .embedding_support import API_KEY

    server = SimulatorServer(config=SimConfig(api_key=API_KEY)).start()
    yield server
    server.stop()


@pytest.fixture
def fresh_sim(sim):
    from .embedding_support import reset_sim

    reset_sim(sim)
    return sim
