"""The Letta family against a real Letta 0.16.8 server, through unchanged fleet code and real worker
processes: agents created from a template as it says, a cohort upgrade (dry run, apply, re-run) that
converges, Agent Files both ways, Letta's statuses classed as the server means them, and every recorded
exchange the simulator is built from still true of the server.

The server is started from the cache (install_letta.sh) unless LETTA_API_BASE_URL names one.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import httpx
import psycopg
import pytest

from fleet.shared.config import Settings
from fleet.shared.errors import ProviderError, classify
from fleet.shared.providers.letta import LettaClient
from fleet.workers.agents.agentfile import parse_agent_file
from fleet.workers.agents.agentview import changes
from fleet.workers.agents.templates import publish
from tests import test_letta_fidelity as fidelity
from tests.agents_service_support import BILLING as SERVICE_BILLING, JWT_ENV, smoke_flow
from tests.conftest import started_fleet
from tests.gateway_process import GatewayProcess
from tests.helpers import wait_for

from .letta_server import LettaServer

BILLING = "https://billing.example.test"
ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = {
    "agents": [
        {
            "name": "support",
            "system": "You help customers.",
            "agent_type": "memgpt_v2_agent",
            "include_base_tools": False,
            "llm_config": {
                "model": "gpt-4o-mini",
                "model_endpoint_type": "openai",
                "model_endpoint": "https://x/v1",
                "context_window": 32000,
            },
            "embedding_config": {
                "embedding_model": "bge-m3",
                "embedding_endpoint_type": "openai",
                "embedding_endpoint": "https://x/v1",
                "embedding_dim": 1024,
            },
            "block_ids": ["b1", "b2"],
            "tool_ids": ["t1", "t2"],
            "tool_rules": [
                {"tool_name": "send_message", "type": "exit_loop"},
                {"tool_name": "conversation_search", "type": "continue_loop"},
            ],
            "tags": ["support"],
            "metadata": {"tier": "basic"},
        }
    ],
    "blocks": [
        {"id": "b1", "label": "persona", "value": "I am kind.", "limit": 2000},
        {"id": "b2", "label": "human", "value": "Name: unknown"},
    ],  # no limit: the server's default
    "tools": [{"id": "t1", "name": "send_message"}, {"id": "t2", "name": "conversation_search"}],
}


@pytest.fixture(scope="module")
def letta_url(cache):
    if os.environ.get("LETTA_API_BASE_URL"):
        yield os.environ["LETTA_API_BASE_URL"].rstrip("/")
        return
    server = LettaServer(cache)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def lfleet(services, letta_url, tmp_path_factory):
    with started_fleet(
        services, "pgmq", tmp_path_factory.mktemp("letta"), LETTA_API_BASE_URL=letta_url, ZUPLO_BASE_URL=BILLING
    ) as f:
        yield f


@pytest.fixture(scope="module")
def letta(letta_url) -> LettaClient:
    return LettaClient(Settings(LETTA_API_BASE_URL=letta_url, LETTA_MAX_RETRIES=2))


def create_agents(lfleet, name: str, version: str, users: int) -> dict[str, str]:
    """{user_id: agent_id} of agents created by the workers."""
    ids = [str(uuid.uuid4()) for _ in range(users)]
    trace = lfleet.trace()
    lfleet.client.enqueue_many(
        "create_agent", [{"user_id": u, "template": name, "version": version} for u in ids], trace_id=trace
    )
    lfleet.wait_done(trace, users, timeout=120)
    with psycopg.connect(lfleet.dsn, autocommit=True) as conn:
        rows = conn.execute(
            "select user_id::text, letta_agent_id from user_profiles where user_id = any(%s::uuid[])", (ids,)
        ).fetchall()
    assert len(rows) == users, f"{users - len(rows)} agent(s) were not created; see {lfleet.log_dir}"
    return dict(rows)


def endpoint(user: str) -> str:
    return f"{BILLING}/api/v1/agents/{user}/messages"


def rules_of(agent: dict) -> list[tuple]:
    return sorted({(r["tool_name"], r["type"]) for r in agent["tool_rules"]})


def test_agents_are_created_as_the_template_says(lfleet, letta):
    name = f"conf-{uuid.uuid4().hex[:8]}"
    publish(name, "1.0.0", TEMPLATE)
    template = parse_agent_file(TEMPLATE)
    for user, agent_id in create_agents(lfleet, name, "1.0.0", 3).items():
        agent = letta.get_agent(agent_id)
        assert agent["agent_type"] == "memgpt_v2_agent"
        assert sorted(t["name"] for t in agent["tools"]) == ["conversation_search", "send_message"]
        assert rules_of(agent) == [("conversation_search", "continue_loop"), ("send_message", "exit_loop")]
        assert [
            (b["label"], b["value"], b["limit"]) for b in sorted(agent["memory"]["blocks"], key=lambda b: b["label"])
        ] == [("human", "Name: unknown", 100000), ("persona", "I am kind.", 2000)]
        assert (
            agent["llm_config"]["model_endpoint"] == agent["embedding_config"]["embedding_endpoint"] == endpoint(user)
        )
        assert agent["metadata"] == {"tier": "basic", "fleet_template": f"{name}@1.0.0", "fleet_user_id": user}
        assert changes(agent, template, endpoint(user)) == {}  # a fresh agent diffs empty against its version


def upgrade(lfleet, name: str, version: str, dry_run: bool) -> list[tuple]:
    from fleet.workers.agents.upgrades import start_run

    run = start_run(name, version, {}, dry_run, lfleet.client)

    def finished():
        with psycopg.connect(lfleet.dsn, autocommit=True) as conn:
            return conn.execute(
                "select 1 from upgrade_runs where id = %s and finished_at is not null", (run,)
            ).fetchone()

    wait_for(finished, 120, what=f"upgrade run {run}")
    with psycopg.connect(lfleet.dsn, autocommit=True) as conn:
        return conn.execute(
            "select agent_id, status, diff, error from agent_upgrades where run_id = %s", (run,)
        ).fetchall()


def snapshot(letta: LettaClient, agent_id: str) -> dict:
    blocks = sorted(letta.blocks(agent_id), key=lambda b: b["id"])
    return {"agent": letta.get_agent(agent_id), "blocks": json.dumps(blocks, sort_keys=True)}


def newer_template() -> dict:
    newer = copy.deepcopy(TEMPLATE)
    spec = newer["agents"][0]
    spec["system"] = "You help customers, in two sentences at most."
    spec["llm_config"]["model"] = "gpt-4o"
    spec["metadata"] = {"tier": "gold"}
    newer["tools"].append({"id": "t3", "name": "memory_insert"})
    spec["tool_ids"].append("t3")
    spec["tool_rules"].append({"tool_name": "memory_insert", "type": "continue_loop"})
    newer["blocks"][0]["value"] = "A new persona that upgrades must never apply."
    return newer


def test_a_cohort_upgrade_converges(lfleet, letta):
    name = f"conf-{uuid.uuid4().hex[:8]}"
    publish(name, "1.0.0", TEMPLATE)
    publish(name, "1.1.0", newer_template())
    agents = create_agents(lfleet, name, "1.0.0", 3)
    before = {a: snapshot(letta, a) for a in agents.values()}

    dry = upgrade(lfleet, name, "1.1.0", dry_run=True)
    assert {r[1] for r in dry} == {"succeeded"}
    assert all(set(r[2]) == {"system", "llm_config", "tools", "tool_rules", "metadata"} for r in dry)
    assert all(letta.get_agent(a)["updated_at"] == before[a]["agent"]["updated_at"] for a in agents.values())

    applied = upgrade(lfleet, name, "1.1.0", dry_run=False)
    assert [(r[1], r[3]) for r in applied] == [("succeeded", None)] * 3
    for user, agent_id in agents.items():
        after = snapshot(letta, agent_id)
        agent = after["agent"]
        assert after["blocks"] == before[agent_id]["blocks"]  # memory byte-identical
        assert agent["system"] == "You help customers, in two sentences at most."
        assert agent["llm_config"]["model"] == "gpt-4o"
        assert (
            agent["llm_config"]["model_endpoint"] == agent["embedding_config"]["embedding_endpoint"] == endpoint(user)
        )
        assert agent["llm_config"]["enable_reasoner"] == before[agent_id]["agent"]["llm_config"]["enable_reasoner"]
        assert agent["metadata"] == {"tier": "gold", "fleet_template": f"{name}@1.0.0", "fleet_user_id": user}
        assert sorted(t["name"] for t in agent["tools"]) == ["conversation_search", "memory_insert", "send_message"]
        assert rules_of(agent) == [
            ("conversation_search", "continue_loop"),
            ("memory_insert", "continue_loop"),
            ("send_message", "exit_loop"),
        ]
    with psycopg.connect(lfleet.dsn, autocommit=True) as conn:
        versions = {
            r[0]
            for r in conn.execute(
                "select template_version from user_profiles where user_id = any(%s::uuid[])", (list(agents),)
            )
        }
    assert versions == {"1.1.0"}

    stamps = {a: letta.get_agent(a)["updated_at"] for a in agents.values()}
    again = upgrade(lfleet, name, "1.1.0", dry_run=False)
    assert [r[1] for r in again] == ["skipped"] * 3
    publish(name, "1.2.0", newer_template())  # the same content again: nothing to change, no PATCH
    same = upgrade(lfleet, name, "1.2.0", dry_run=False)
    assert [(r[1], r[2]) for r in same] == [("succeeded", {})] * 3
    assert {a: letta.get_agent(a)["updated_at"] for a in agents.values()} == stamps  # the server saw no PATCH


def test_a_conflict_is_permanent(lfleet, letta):
    name = f"conf-{uuid.uuid4().hex[:8]}"
    publish(name, "1.0.0", TEMPLATE)
    (agent_id,) = create_agents(lfleet, name, "1.0.0", 1).values()
    with pytest.raises(ProviderError) as e:
        letta.update_agent(agent_id, {"tool_ids": ["tool-00000000-0000-4000-8000-00000000abcd"]})
    assert e.value.status == 409 and classify(e.value) == "permanent"


def test_the_agent_service_flow_over_http(lfleet, letta, tmp_path):
    """Publish, create, /me, publish, dry run, apply, /me: through the gateway, the workers and the real server."""
    assert SERVICE_BILLING == BILLING  # the flow checks the endpoints the workers force
    with GatewayProcess(lfleet.env | JWT_ENV, tmp_path) as gateway:
        flow = smoke_flow(gateway.url, TEMPLATE)
    agent = letta.get_agent(flow["agent_id"])
    assert (
        agent["llm_config"]["model_endpoint"]
        == agent["embedding_config"]["embedding_endpoint"]
        == endpoint(flow["user"])
    )


def shape(agent: dict) -> dict:
    return {
        "agent_type": agent["agent_type"],
        "system": agent["system"],
        "tags": sorted(agent["tags"]),
        "tools": sorted(t["name"] for t in agent["tools"]),
        "tool_rules": rules_of(agent),
        "blocks": sorted((b["label"], b["value"], b["limit"]) for b in agent["memory"]["blocks"]),
        "llm": {k: v for k, v in agent["llm_config"].items() if k != "model_endpoint"},
        "embedding": {k: v for k, v in agent["embedding_config"].items() if k != "embedding_endpoint"},
    }


def test_an_exported_agent_file_publishes_and_creates_a_matching_agent(lfleet, letta):
    name = f"conf-{uuid.uuid4().hex[:8]}"
    publish(name, "1.0.0", TEMPLATE)
    (source_id,) = create_agents(lfleet, name, "1.0.0", 1).values()
    publish(name, "2.0.0", letta.export_agent(source_id))
    (copy_id,) = create_agents(lfleet, name, "2.0.0", 1).values()
    assert shape(letta.get_agent(copy_id)) == shape(letta.get_agent(source_id))


def test_templates_export_writes_a_file_the_server_imports(lfleet, letta, letta_url, tmp_path):
    name = f"conf-{uuid.uuid4().hex[:8]}"
    publish(name, "1.0.0", TEMPLATE)
    path = tmp_path / "agent.af"
    env = dict(os.environ) | {"LETTA_API_BASE_URL": letta_url}
    subprocess.run(
        [sys.executable, "-m", "fleet.ops.cli", "templates", "export", name, "1.0.0", "-o", str(path)],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    (agent_id,) = letta.import_agent(json.loads(path.read_text()))
    imported = letta.get_agent(agent_id)
    assert imported["name"] == "support_copy"  # the server marks an imported agent as a copy
    (created,) = create_agents(lfleet, name, "1.0.0", 1).values()
    # the server's import path leaves put_inner_thoughts_in_kwargs off where its create turns it on
    assert without_inner_thoughts(shape(imported)) == without_inner_thoughts(shape(letta.get_agent(created)))


def without_inner_thoughts(agent_shape: dict) -> dict:
    return agent_shape | {"llm": {k: v for k, v in agent_shape["llm"].items() if k != "put_inner_thoughts_in_kwargs"}}


# The recorded exchanges the simulator is built from, replayed against the real server: they still hold.
@pytest.mark.parametrize("name", fidelity.CREATES)
def test_recorded_creates_hold(letta_url, name):
    answer = fidelity.replay(SimpleNamespace(url=letta_url), name)
    assert answer.status_code == 200
    assert fidelity.agent_fields(answer.json()) == fidelity.agent_fields(fidelity.recorded(name)["response"]["body"])


@pytest.mark.parametrize("name", fidelity.REFUSALS + fidelity.PATCH_REFUSALS + ["patch_unknown_tool_id"])
def test_recorded_refusals_hold(letta_url, name):
    server = SimpleNamespace(url=letta_url)
    agent_id = fidelity.replay(server, "create_agent").json()["id"]
    answer, expected = fidelity.replay(server, name, agent_id), fidelity.recorded(name)["response"]
    assert answer.status_code == expected["status"]
    if name not in ("import_fleet_template_as_is", "patch_unknown_tool_id"):
        assert fidelity.error_fields(answer.json()) == fidelity.error_fields(expected["body"])


def test_lists_page_and_redirect_as_recorded(letta_url):
    server = SimpleNamespace(url=letta_url)
    redirect = fidelity.replay(server, "list_agents_without_slash")
    assert (redirect.status_code, redirect.headers["location"].removeprefix(letta_url)) == (307, "/v1/agents/")
    for _ in range(51 - len(httpx.get(f"{letta_url}/v1/agents/?limit=51").json())):
        fidelity.replay(server, "create_agent")
    assert len(httpx.get(f"{letta_url}/v1/agents/").json()) == 50
    assert len(httpx.get(f"{letta_url}/v1/tools/").json()) == 26
