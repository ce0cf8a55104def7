"""Agent creation through the Letta subset of the simulator: billing endpoints forced, idempotent per user."""

from __future__ import annotations

import copy
import json
import os
import uuid

import httpx
import psycopg
import pytest

from fleet.workers.agents.templates import publish

from .conftest import started_fleet
from .embedding_support import API_KEY
from .helpers import dead_letters
from .test_templates import AGENT

BILLING = "https://billing.example.test"


@pytest.fixture(scope="module")
def afleet(services, sim, tmp_path_factory):
    with started_fleet(
        services,
        "pgmq",
        tmp_path_factory.mktemp("agents"),
        LETTA_API_BASE_URL=sim.url,
        LETTA_API_KEY=API_KEY,
        ZUPLO_BASE_URL=BILLING,
    ) as f:
        yield f


def letta_state(sim) -> dict:
    return httpx.get(f"{sim.url}/_sim/letta").json()


def test_create_agent_forces_the_billing_proxy_and_is_idempotent(afleet, sim):
    name = f"a-{uuid.uuid4().hex[:8]}"
    publish(name, "1.0.0", AGENT)
    user = str(uuid.uuid4())
    trace = afleet.trace()
    afleet.client.enqueue_many("create_agent", [{"user_id": user, "template": name}] * 2, trace_id=trace)
    afleet.wait_done(trace, 2)
    agents = [a for a in letta_state(sim)["agents"].values() if a["name"] == f"{name}-{user}"]
    assert len(agents) == 1  # two jobs, one agent
    agent = agents[0]
    endpoint = f"{BILLING}/api/v1/agents/{user}/messages"
    assert agent["llm_config"]["model_endpoint"] == endpoint
    assert agent["embedding_config"]["embedding_endpoint"] == endpoint
    assert agent["llm_config"]["model"] == "gpt-4o-mini"  # the rest of the template's config is kept
    assert [(b["label"], b["value"]) for b in agent["memory"]["blocks"]] == [("persona", "I am kind."), ("human", "")]
    assert [t["name"] for t in agent["tools"]] == ["send_message"]
    with psycopg.connect(afleet.dsn, autocommit=True) as conn:
        profile = conn.execute(
            "select letta_agent_id, template_name, template_version from user_profiles where user_id = %s", (user,)
        ).fetchone()
        assert profile == (agent["id"], name, "1.0.0")
        # a crash after Letta answered but before the profile was stored: the retry finds the agent by name
        conn.execute("delete from user_profiles where user_id = %s", (user,))
    again = afleet.trace()
    afleet.client.enqueue("create_agent", {"user_id": user, "template": name}, trace_id=again)
    afleet.wait_done(again, 1)
    assert len([a for a in letta_state(sim)["agents"].values() if a["name"] == f"{name}-{user}"]) == 1
    with psycopg.connect(afleet.dsn, autocommit=True) as conn:
        assert (
            conn.execute("select letta_agent_id from user_profiles where user_id = %s", (user,)).fetchone()[0]
            == agent["id"]
        )


def test_unknown_template_is_dead_lettered(afleet, sim):
    trace = afleet.trace()
    afleet.client.enqueue(
        "create_agent", {"user_id": str(uuid.uuid4()), "template": "no-such-template"}, trace_id=trace
    )
    afleet.wait_done(trace, 1)
    (dl,) = dead_letters(afleet.dsn, trace)
    assert "template 'no-such-template' has no published version" in dl["reason"]


def test_a_worker_for_agents_refuses_to_start_without_the_billing_proxy():
    from .test_cli_and_services import fleet_cli

    env = {k: v for k, v in os.environ.items() if k != "ZUPLO_BASE_URL"}
    out = fleet_cli("worker", "--queues", "agents", env=env, check=False)
    assert out.returncode == 2 and "ZUPLO_BASE_URL is not set" in out.stderr


def create_for(afleet, sim, name: str, version: str = "1.0.0") -> dict:
    """One agent created by a worker from a published template; the simulator's copy of it."""
    user = str(uuid.uuid4())
    trace = afleet.trace()
    afleet.client.enqueue("create_agent", {"user_id": user, "template": name, "version": version}, trace_id=trace)
    afleet.wait_done(trace, 1)
    with psycopg.connect(afleet.dsn, autocommit=True) as conn:
        row = conn.execute("select letta_agent_id from user_profiles where user_id = %s", (user,)).fetchone()
    assert row, dead_letters(afleet.dsn, trace)
    return letta_state(sim)["agents"][row[0]]


def test_creation_honours_the_templates_agent_type_tools_and_rules(afleet, sim):
    """Letta's defaults (letta_v1_agent with its base tools, base tool rules) must not replace the template's."""
    name = f"a-{uuid.uuid4().hex[:8]}"
    publish(name, "1.0.0", AGENT)
    agent = create_for(afleet, sim, name)
    assert [t["name"] for t in agent["tools"]] == ["send_message"]
    assert agent["tool_rules"] == [{"tool_name": "send_message", "type": "exit_loop", "prompt_template": None}]
    typed = copy.deepcopy(AGENT)
    typed["agents"][0] |= {"agent_type": "memgpt_v2_agent", "include_base_tools": True}
    publish(name, "1.1.0", typed)
    agent = create_for(afleet, sim, name, "1.1.0")
    assert agent["agent_type"] == "memgpt_v2_agent"
    assert {t["name"] for t in agent["tools"]} == {
        "send_message",
        "conversation_search",
        "memory_insert",
        "memory_replace",
    }
    assert agent["tool_rules"] == [{"tool_name": "send_message", "type": "exit_loop", "prompt_template": None}]


def test_a_block_without_a_limit_gets_the_servers_default(afleet, sim):
    name = f"a-{uuid.uuid4().hex[:8]}"
    content = copy.deepcopy(AGENT)
    del content["blocks"][1]["limit"]  # sent as "limit": null, Letta answers 422
    publish(name, "1.0.0", content)
    agent = create_for(afleet, sim, name)
    assert [(b["label"], b["limit"]) for b in agent["memory"]["blocks"]] == [("persona", 2000), ("human", 100000)]


def test_lettas_409_is_permanent_and_not_retried(afleet, sim):
    from fleet.shared.config import Settings
    from fleet.shared.errors import ProviderError, classify
    from fleet.shared.providers.letta import LettaClient

    name = f"a-{uuid.uuid4().hex[:8]}"
    publish(name, "1.0.0", AGENT)
    agent = create_for(afleet, sim, name)
    letta = LettaClient(Settings(LETTA_API_BASE_URL=sim.url, LETTA_API_KEY=API_KEY, LETTA_MAX_RETRIES=3))
    with pytest.raises(ProviderError) as e:  # a tool id the server does not have: its foreign key refuses it
        letta.update_agent(agent["id"], {"tool_ids": ["tool-00000000-0000-4000-8000-00000000abcd"]})
    assert e.value.status == 409 and classify(e.value) == "permanent"
    patches = [
        r for r in httpx.get(f"{sim.url}/_sim/log").json() if r["method"] == "PATCH" and agent["id"] in r["path"]
    ]
    assert [r["status"] for r in patches] == [409]  # asked once


def test_an_exported_agent_file_publishes_and_creates_a_matching_agent(afleet, sim):
    name = f"a-{uuid.uuid4().hex[:8]}"
    original = copy.deepcopy(AGENT)
    original["agents"][0] |= {
        "agent_type": "memgpt_v2_agent",
        "include_base_tools": True,
        "include_base_tool_rules": True,
    }
    publish(name, "1.0.0", original)
    source = create_for(afleet, sim, name)
    exported = httpx.get(f"{sim.url}/v1/agents/{source['id']}/export", headers={"Authorization": f"Bearer {API_KEY}"})
    publish(name, "2.0.0", exported.json())  # a file as Letta writes it: include_base_tools false, every tool listed
    copy_ = create_for(afleet, sim, name, "2.0.0")
    assert agent_shape(copy_) == agent_shape(source)


def agent_shape(agent: dict) -> dict:
    return {
        "agent_type": agent["agent_type"],
        "tools": sorted(t["name"] for t in agent["tools"]),
        "tool_rules": sorted({json.dumps(r, sort_keys=True) for r in agent["tool_rules"]}),
        "system": agent["system"],
        "blocks": [(b["label"], b["value"], b["limit"]) for b in agent["memory"]["blocks"]],
        "tags": agent["tags"],
        "llm_config": {k: v for k, v in agent["llm_config"].items() if k != "model_endpoint"},  # per user
        "embedding_config": {k: v for k, v in agent["embedding_config"].items() if k != "embedding_endpoint"},
    }


def test_templates_export_writes_an_agent_file_letta_imports(afleet, sim, tmp_path):
    from .helpers import fleet_cli

    name = f"a-{uuid.uuid4().hex[:8]}"
    publish(name, "1.0.0", AGENT)
    path = tmp_path / "agent.af"
    env = dict(os.environ) | {"LETTA_API_BASE_URL": sim.url, "LETTA_API_KEY": API_KEY}
    assert f"wrote {name}@1.0.0" in fleet_cli("templates", "export", name, "1.0.0", "-o", str(path), env=env).stdout
    files = {"file": ("agent.af", path.read_bytes(), "application/json")}
    imported = httpx.post(f"{sim.url}/v1/agents/import", files=files, headers={"Authorization": f"Bearer {API_KEY}"})
    assert imported.status_code == 200, imported.text
    agent = letta_state(sim)["agents"][imported.json()["agent_ids"][0]]
    assert [t["name"] for t in agent["tools"]] == ["send_message"] and agent["system"] == AGENT["agents"][0]["system"]
    assert [(b["label"], b["value"], b["limit"]) for b in agent["memory"]["blocks"]] == [
        ("persona", "I am kind.", 2000),
        ("human", "", 2000),
    ]
    offline = {k: v for k, v in env.items() if k != "LETTA_API_BASE_URL"}
    refused = fleet_cli("templates", "export", name, "1.0.0", env=offline, check=False)
    assert refused.returncode == 2 and "set LETTA_API_BASE_URL" in refused.stderr
