"""Cohort upgrades through real workers and the simulator's Letta subset: dry runs, one PATCH per agent,
memory left byte-identical, a server that alters memory caught, the halt threshold, stale heartbeats."""

from __future__ import annotations

import copy
import json
import uuid

import httpx
import psycopg
import pytest

from fleet.workers.agents.templates import publish

from .conftest import started_fleet
from .embedding_support import API_KEY
from .helpers import wait_for
from .test_templates import AGENT

BILLING = "https://billing.example.test"


@pytest.fixture(scope="module", params=["pgmq", "redis"])
def ufleet(request, services, sim, tmp_path_factory):
    with started_fleet(
        services,
        request.param,
        tmp_path_factory.mktemp("upgrades"),
        LETTA_API_BASE_URL=sim.url,
        LETTA_API_KEY=API_KEY,
        ZUPLO_BASE_URL=BILLING,
        UPGRADE_HALT_MIN_SAMPLE="3",
        UPGRADE_HALT_FAILURE_RATE="0.5",
    ) as f:
        yield f


@pytest.fixture(autouse=True)
def sane_letta(sim):
    httpx.post(
        f"{sim.url}/_sim/config", json={"alter_block_on_patch": False, "api_key": API_KEY, "letta_latency_ms": 0}
    )


def letta(sim) -> dict:
    return httpx.get(f"{sim.url}/_sim/letta").json()


def cohort(ufleet, sim, users: int) -> tuple[str, list[str]]:
    name = f"u-{uuid.uuid4().hex[:8]}"
    publish(name, "1.0.0", AGENT)
    newer = copy.deepcopy(AGENT)
    newer["agents"][0]["system"] = "You help customers, in two sentences at most."
    newer["agents"][0]["llm_config"]["model"] = "gpt-4o"
    newer["blocks"][0]["value"] = "A new persona that upgrades must never apply."
    newer["agents"][0]["metadata"] = {"tier": "gold"}  # merged into the agent's: the fleet's keys stay
    newer["tools"].append({"id": "t2", "name": "conversation_search"})
    newer["agents"][0]["tool_ids"].append("t2")
    newer["agents"][0]["tool_rules"].append({"tool_name": "conversation_search", "type": "continue_loop"})
    publish(name, "1.1.0", newer)
    ids = [str(uuid.uuid4()) for _ in range(users)]
    trace = ufleet.trace()
    ufleet.client.enqueue_many(
        "create_agent", [{"user_id": u, "template": name, "version": "1.0.0"} for u in ids], trace_id=trace
    )
    ufleet.wait_done(trace, users)
    return name, ids


def run_upgrade(ufleet, name: str, version: str, *, dry_run: bool, cohort_filter: dict | None = None, halt=None) -> str:
    from fleet.workers.agents.upgrades import HaltPolicy, start_run

    run = start_run(
        name,
        version,
        cohort_filter or {},
        dry_run,
        ufleet.client,  # SQL on pgmq, the SDK on Redis
        halt=halt or HaltPolicy(),
    )

    def finished():
        with psycopg.connect(ufleet.dsn, autocommit=True) as conn:
            return conn.execute(
                "select status from upgrade_runs where id = %s and finished_at is not null", (run,)
            ).fetchone()

    wait_for(finished, 60, what=f"upgrade run {run}")
    return run


def rows(dsn: str, run: str) -> list[dict]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(
            "select agent_id, status, diff, error, attempts from agent_upgrades where run_id = %s", (run,)
        )
        return [dict(zip(["agent_id", "status", "diff", "error", "attempts"], r)) for r in cur]


def test_dry_run_changes_nothing_then_apply_patches_once_and_keeps_memory(ufleet, sim):
    name, users = cohort(ufleet, sim, 5)
    agents = {a["id"]: a for a in letta(sim)["agents"].values() if a["name"].startswith(name)}
    memory_before = {i: json.dumps(a["memory"]["blocks"], sort_keys=True) for i, a in agents.items()}

    dry = run_upgrade(ufleet, name, "1.1.0", dry_run=True)
    dry_rows = rows(ufleet.dsn, dry)
    assert [r["status"] for r in dry_rows] == ["succeeded"] * 5
    # only what the template names: the server's own config defaults are not differences
    assert all(set(r["diff"]) == {"system", "llm_config", "tools", "tool_rules", "metadata"} for r in dry_rows)
    assert dry_rows[0]["diff"]["llm_config"]["from"] == {
        "model": "gpt-4o-mini",
        "model_endpoint_type": "openai",
        "model_endpoint": dry_rows[0]["diff"]["llm_config"]["to"]["model_endpoint"],
        "context_window": 32000,
    }
    assert dry_rows[0]["diff"]["llm_config"]["to"]["model"] == "gpt-4o"
    assert dry_rows[0]["diff"]["llm_config"]["to"]["model_endpoint"].startswith(BILLING)
    state = letta(sim)
    assert not any(state["patches"].get(i) for i in agents)  # nothing changed on the server

    applied = run_upgrade(ufleet, name, "1.1.0", dry_run=False)
    assert [r["status"] for r in rows(ufleet.dsn, applied)] == ["succeeded"] * 5
    state = letta(sim)
    for agent_id in agents:
        agent = state["agents"][agent_id]
        assert state["patches"][agent_id] == 1  # one PATCH per agent
        assert agent["system"] == "You help customers, in two sentences at most."
        user = agent["metadata"]["fleet_user_id"]
        assert agent["llm_config"]["model"] == "gpt-4o"
        assert (
            agent["llm_config"]["model_endpoint"]
            == agent["embedding_config"]["embedding_endpoint"]
            == f"{BILLING}/api/v1/agents/{user}/messages"
        )
        assert json.dumps(agent["memory"]["blocks"], sort_keys=True) == memory_before[agent_id]  # byte-identical
        assert agent["llm_config"]["enable_reasoner"] is False  # a partial llm_config PATCH flipped it on
        assert agent["metadata"] == {"fleet_template": f"{name}@1.0.0", "fleet_user_id": user, "tier": "gold"}
        assert sorted(t["name"] for t in agent["tools"]) == ["conversation_search", "send_message"]
        assert sorted((r["tool_name"], r["type"]) for r in agent["tool_rules"]) == [
            ("conversation_search", "continue_loop"),
            ("send_message", "exit_loop"),
        ]
    with psycopg.connect(ufleet.dsn, autocommit=True) as conn:
        versions = {
            r[0]
            for r in conn.execute(
                "select template_version from user_profiles where user_id = any(%s::uuid[])", (users,)
            )
        }
        done = conn.execute(
            "select payload from bus_events where type = 'upgrade.done' and payload->>'run_id' = %s", (applied,)
        ).fetchone()[0]
    assert versions == {"1.1.0"} and done["counts"] == {"succeeded": 5}
    again = run_upgrade(ufleet, name, "1.1.0", dry_run=False)
    assert [r["status"] for r in rows(ufleet.dsn, again)] == ["skipped"] * 5
    assert all(letta(sim)["patches"][i] == 1 for i in agents)  # the re-run sent no PATCH


def test_a_fresh_agent_diffs_empty_against_its_own_version(ufleet, sim):
    """The server fills 27 llm_config keys and adds fields to tool rules: none of that is a difference.
    The same content republished as 1.2.0 upgrades every agent without a PATCH, and the version is recorded."""
    name, users = cohort(ufleet, sim, 3)
    publish(name, "1.2.0", AGENT)
    run = run_upgrade(ufleet, name, "1.2.0", dry_run=False)
    assert [(r["status"], r["diff"], r["error"]) for r in rows(ufleet.dsn, run)] == [("succeeded", {}, None)] * 3
    state = letta(sim)
    assert not any(state["patches"].get(r["agent_id"]) for r in rows(ufleet.dsn, run))
    with psycopg.connect(ufleet.dsn, autocommit=True) as conn:
        versions = {
            r[0]
            for r in conn.execute(
                "select template_version from user_profiles where user_id = any(%s::uuid[])", (users,)
            )
        }
    assert versions == {"1.2.0"}


def test_a_server_that_alters_memory_during_the_upgrade_is_reported_failed(ufleet, sim):
    name, _ = cohort(ufleet, sim, 1)
    httpx.post(f"{sim.url}/_sim/config", json={"alter_block_on_patch": True})
    run = run_upgrade(ufleet, name, "1.1.0", dry_run=False)
    (row,) = rows(ufleet.dsn, run)
    assert row["status"] == "failed"
    assert row["error"] == "memory blocks changed during the upgrade (label, value or limit differ)"


def test_a_bad_template_halts_the_run(ufleet, sim):
    name, _ = cohort(ufleet, sim, 8)
    broken = copy.deepcopy(AGENT)
    broken["agents"][0]["tool_rules"][0]["type"] = "no_such_rule"  # Letta answers 422 to this tool rule
    publish(name, "2.0.0", broken)
    run = run_upgrade(ufleet, name, "2.0.0", dry_run=False)
    statuses = [r["status"] for r in rows(ufleet.dsn, run)]
    with psycopg.connect(ufleet.dsn, autocommit=True) as conn:
        status = conn.execute("select status from upgrade_runs where id = %s", (run,)).fetchone()[0]
    assert status == "halted"
    assert statuses.count("failed") >= 3 and statuses.count("succeeded") == 0
    assert statuses.count("failed") + statuses.count("cancelled") == 8


def test_a_runs_own_halt_policy_replaces_the_settings(ufleet, sim):
    from fleet.workers.agents.upgrades import HaltPolicy

    name, _ = cohort(ufleet, sim, 4)
    broken = copy.deepcopy(AGENT)
    broken["agents"][0]["tool_rules"][0]["type"] = "no_such_rule"
    publish(name, "2.0.0", broken)
    # the settings would halt after 3 failures; this run waits for 10 finished agents, more than it has
    run = run_upgrade(ufleet, name, "2.0.0", dry_run=False, halt=HaltPolicy(failure_rate=0.5, min_sample=10))
    with psycopg.connect(ufleet.dsn, autocommit=True) as conn:
        status = conn.execute("select status from upgrade_runs where id = %s", (run,)).fetchone()[0]
    assert status == "completed"
    assert [r["status"] for r in rows(ufleet.dsn, run)] == ["failed"] * 4


def test_stale_heartbeats_are_requeued_and_finished(ufleet, sim):
    from fleet.shared.config import Settings
    from fleet.workers.agents.upgrades import requeue_stale

    name, users = cohort(ufleet, sim, 1)
    with psycopg.connect(ufleet.dsn, autocommit=True) as conn:
        run = str(
            conn.execute(
                "insert into upgrade_runs (template_name, to_version, dry_run, status)"
                " values (%s, '1.1.0', false, 'running') returning id",
                (name,),
            ).fetchone()[0]
        )
        agent_id = conn.execute("select letta_agent_id from user_profiles where user_id = %s", (users[0],)).fetchone()[
            0
        ]
        conn.execute(
            "insert into agent_upgrades (run_id, agent_id, user_id, from_version, to_version, dry_run, status,"
            " attempts, heartbeat_at) values (%s, %s, %s, '1.0.0', '1.1.0', false, 'running', 1,"
            " now() - interval '10 minutes')",
            (run, agent_id, users[0]),
        )
    # other tests' rows may be stale too on a slow machine: what counts is that this one goes back and finishes
    assert requeue_stale(Settings(UPGRADE_STALE_AFTER_S=60), ufleet.client) >= 1
    wait_for(lambda: rows(ufleet.dsn, run)[0]["status"] == "succeeded", 30, what="the requeued upgrade")
    assert rows(ufleet.dsn, run)[0]["attempts"] == 2
    assert letta(sim)["patches"][agent_id] == 1


def test_upgrade_cli(ufleet, sim):
    from .helpers import fleet_cli

    name, _ = cohort(ufleet, sim, 2)
    import os

    env = dict(os.environ) | {"FLEET_BROKER": ufleet.kind}
    out = fleet_cli("upgrade", "run", name, "1.1.0", "--dry-run", env=env).stdout
    run = out.split()[2]
    wait_for(
        lambda: json.loads(fleet_cli("upgrade", "status", run, "--json").stdout)["status"] == "completed",
        30,
        what="the dry run to complete",
    )
    status = json.loads(fleet_cli("upgrade", "status", run, "--json").stdout)
    assert status["by_status"] == {"succeeded": 2} and status["dry_run"] is True
    missing = fleet_cli("upgrade", "run", name, "9.9.9", env=env, check=False)
    assert missing.returncode == 2 and "is not published" in missing.stderr
