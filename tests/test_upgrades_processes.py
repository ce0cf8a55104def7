"""A worker killed in the middle of an upgrade run: no agent is lost and none is upgraded twice.
No other upgrade workers run in this module, so these processes alone take the jobs."""

from __future__ import annotations

import copy
import uuid

import httpx
import psycopg

from fleet.workers.agents.templates import publish
from fleet.workers.agents.upgrades import start_run

from .conftest import make_client, worker_env
from .embedding_support import API_KEY
from .helpers import WorkerGroup, wait_for
from .test_templates import AGENT


def test_a_worker_killed_mid_run_loses_no_agent_and_upgrades_none_twice(services, sim, tmp_path):
    env = worker_env(
        services,
        "pgmq",
        LETTA_API_BASE_URL=sim.url,
        LETTA_API_KEY=API_KEY,
        ZUPLO_BASE_URL="https://billing.example.test",
        UPGRADE_STALE_AFTER_S="6",
        UPGRADE_HEARTBEAT_S="1",
    )  # the takeover after the kill within seconds
    client = make_client("pgmq")
    name = f"k-{uuid.uuid4().hex[:8]}"
    publish(name, "1.0.0", AGENT)
    newer = copy.deepcopy(AGENT)
    newer["agents"][0]["system"] = "Upgraded."
    publish(name, "1.1.0", newer)
    users = [str(uuid.uuid4()) for _ in range(12)]
    group = WorkerGroup(env, threads=4, log_dir=tmp_path).start()
    try:
        trace = str(uuid.uuid4())
        client.enqueue_many(
            "create_agent", [{"user_id": u, "template": name, "version": "1.0.0"} for u in users], trace_id=trace
        )
        wait_for(
            lambda: _count(services["dsn"], "select count(*) from user_profiles where template_name = %s", name) == 12,
            30,
            what="twelve agents",
        )
        httpx.post(f"{sim.url}/_sim/config", json={"letta_latency_ms": 150})  # each upgrade takes ~0.75 s
        run = start_run(name, "1.1.0", {}, False, client)
        wait_for(
            lambda: (
                _count(
                    services["dsn"],
                    "select count(*) from agent_upgrades where run_id = %s and status = 'succeeded'",
                    run,
                )
                >= 2
            ),
            30,
            what="some upgrades to finish",
        )
        group.kill()
        killed_with = _count(
            services["dsn"], "select count(*) from agent_upgrades where run_id = %s and status = 'succeeded'", run
        )
        group = WorkerGroup(env, threads=4, log_dir=tmp_path).start()
        wait_for(
            lambda: (
                _count(
                    services["dsn"], "select count(*) from upgrade_runs where id = %s and finished_at is not null", run
                )
                == 1
            ),
            90,
            what="the run to finish after the kill",
        )
    finally:
        httpx.post(f"{sim.url}/_sim/config", json={"letta_latency_ms": 0})
        group.terminate()
        client.broker.close()
    assert killed_with < 12, "the kill should land mid-run"
    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        statuses = [r[0] for r in conn.execute("select status from agent_upgrades where run_id = %s", (run,))]
        agent_ids = [
            r[0] for r in conn.execute("select letta_agent_id from user_profiles where template_name = %s", (name,))
        ]
    assert statuses == ["succeeded"] * 12  # none lost
    patches = httpx.get(f"{sim.url}/_sim/letta").json()["patches"]
    assert [patches.get(a) for a in agent_ids] == [1] * 12  # none upgraded twice


def _count(dsn: str, sql: str, arg) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, (arg,)).fetchone()[0]
