"""Agent creation through the Letta subset of the simulator: billing endpoints forced, idempotent per user."""

from __future__ import annotations

import os
import uuid

import httpx
import psycopg
import pytest

from shared.templates import publish

from .conftest import started_fleet
from .embedding_support import API_KEY
from .helpers import dead_letters
from .test_templates import AGENT

BILLING = "https://billing.example.test"


@pytest.fixture(scope="module")
def afleet(services, sim, tmp_path_factory):
    with started_fleet(services, "pgmq", tmp_path_factory.mktemp("agents"), LETTA_API_BASE_URL=sim.url,
                       LETTA_API_KEY=API_KEY, ZUPLO_BASE_URL=BILLING) as f:
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
        profile = conn.execute("select letta_agent_id, template_name, template_version from user_profiles"
                               " where user_id = %s", (user,)).fetchone()
        assert profile == (agent["id"], name, "1.0.0")
        # a crash after Letta answered but before the profile was stored: the retry finds the agent by name
        conn.execute("delete from user_profiles where user_id = %s", (user,))
    again = afleet.trace()
    afleet.client.enqueue("create_agent", {"user_id": user, "template": name}, trace_id=again)
    afleet.wait_done(again, 1)
    assert len([a for a in letta_state(sim)["agents"].values() if a["name"] == f"{name}-{user}"]) == 1
    with psycopg.connect(afleet.dsn, autocommit=True) as conn:
        assert conn.execute("select letta_agent_id from user_profiles where user_id = %s", (user,)).fetchone()[0] == agent["id"]


def test_unknown_template_is_dead_lettered(afleet, sim):
    trace = afleet.trace()
    afleet.client.enqueue("create_agent", {"user_id": str(uuid.uuid4()), "template": "no-such-template"}, trace_id=trace)
    afleet.wait_done(trace, 1)
    (dl,) = dead_letters(afleet.dsn, trace)
    assert "template 'no-such-template' has no published version" in dl["reason"]


def test_simulator_is_faithful_to_letta_validation(sim):
    body = {"name": "x", "llm_config": {"model": "m", "model_endpoint_type": "openai", "context_window": 8000},
            "embedding_config": {"embedding_endpoint_type": "openai", "embedding_model": "e", "embedding_dim": 1024}}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    agent = httpx.post(f"{sim.url}/v1/agents/", json=body, headers=headers).json()
    partial = httpx.patch(f"{sim.url}/v1/agents/{agent['id']}", json={"llm_config": {"model": "m2"}}, headers=headers)
    assert partial.status_code == 422  # a PATCH replaces llm_config whole
    assert httpx.get(f"{sim.url}/v1/agents/agent-unknown", headers=headers).status_code == 404
    whole = httpx.patch(f"{sim.url}/v1/agents/{agent['id']}", json={"llm_config": body["llm_config"] | {"model": "m2"}},
                        headers=headers)
    assert whole.status_code == 200 and whole.json()["llm_config"]["model"] == "m2"


def test_a_worker_for_agents_refuses_to_start_without_the_billing_proxy():
    from .test_cli_and_services import fleet_cli

    env = {k: v for k, v in os.environ.items() if k != "ZUPLO_BASE_URL"}
    out = fleet_cli("worker", "--queues", "agents", env=env, check=False)
    assert out.returncode == 2 and "ZUPLO_BASE_URL is not set" in out.stderr
