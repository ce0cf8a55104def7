"""The simulator's Letta subset answers as the real Letta 0.16.8 server did: every recorded exchange in
tests/fixtures/letta/ (re-recorded by `python -m conformance.record_letta`) is replayed against the
simulator and its answer compared with the server's, field by field where the fleet reads them."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import httpx
import pytest

from .embedding_support import API_KEY

FIXTURES = Path(__file__).parent / "fixtures" / "letta"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
SERVER_ID = re.compile(
    r"(agent|block|tool|user|org|provider|message)-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
)


def recorded(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


RECORDED_AGENT = recorded("create_agent")["response"]["body"]["id"]


def replay(sim, name: str, agent_id: str | None = None) -> httpx.Response:
    """The recorded request sent to the simulator, the recorded agent's id replaced by this agent's."""
    request = recorded(name)["request"]
    path, body = request["path"], request["body"]
    if agent_id:
        path = path.replace(RECORDED_AGENT, agent_id)
        body = json.loads(json.dumps(body).replace(RECORDED_AGENT, agent_id))
    if request.get("multipart"):
        files = {"file": ("agent.af", json.dumps(body), "application/json")}
        return httpx.post(f"{sim.url}{path}", files=files, headers=HEADERS)
    return httpx.request(request["method"], f"{sim.url}{path}", json=body, headers=HEADERS, follow_redirects=False)


def agent_fields(agent: dict) -> dict:
    """What the fleet reads of an agent, with the server's ids and times left out."""
    rules = sorted(json.dumps(r, sort_keys=True) for r in agent["tool_rules"])
    blocks = sorted((b["label"], b["value"], b["limit"], b["description"]) for b in agent["memory"]["blocks"])
    return {
        "keys": sorted(agent),
        "agent_type": agent["agent_type"],
        "llm_config": agent["llm_config"],
        "embedding_config": agent["embedding_config"],
        "tools": sorted(t["name"] for t in agent["tools"]),
        "tool_keys": sorted({k for t in agent["tools"] for k in t}),
        "tool_rules": rules,
        "tags": agent["tags"],
        "metadata": agent["metadata"],
        "system": agent["system"],
        "blocks": blocks,
    }


def error_fields(body: dict) -> dict:
    """An error body without ids; a 422's `detail` (the repr of pydantic's errors) as its types and places."""
    detail = body.get("detail")
    try:
        errors = ast.literal_eval(detail)
        detail = [(e["type"], e["loc"], e["msg"]) for e in errors]
    except (ValueError, SyntaxError, TypeError):
        detail = SERVER_ID.sub("<id>", str(detail))
    return {"keys": sorted(body), "detail": detail}


CREATES = ["create_agent", "create_agent_server_defaults", "create_agent_memgpt_v2_base_tools"]
REFUSALS = [
    "create_unknown_tool",
    "create_null_block_limit",
    "create_unknown_tool_rule_type",
    "create_without_configs",
    "get_agent_malformed_id",
    "get_agent_unknown_id",
    "import_fleet_template_as_is",
    "import_wrong_id_format",
]
PATCH_REFUSALS = ["patch_partial_llm_config", "patch_malformed_tool_id"]


@pytest.mark.parametrize("name", CREATES)
def test_a_create_gives_the_recorded_agent(sim, name):
    answer = replay(sim, name)
    assert answer.status_code == 200
    assert agent_fields(answer.json()) == agent_fields(recorded(name)["response"]["body"])
    assert SERVER_ID.fullmatch(answer.json()["id"])  # agent-{uuid4}


@pytest.mark.parametrize("name", REFUSALS + PATCH_REFUSALS)
def test_a_refused_request_gets_the_recorded_status_and_body(sim, name):
    agent_id = replay(sim, "create_agent").json()["id"]
    answer, expected = replay(sim, name, agent_id), recorded(name)["response"]
    assert answer.status_code == expected["status"]
    if name == "import_fleet_template_as_is":  # pydantic's long text: the same missing fields, in order
        locs = re.findall(r"^(\S+)\n  Field required", expected["body"]["detail"], re.M)
        assert re.findall(r"^(\S+)\n  Field required", answer.json()["detail"], re.M) == locs
    else:
        assert error_fields(answer.json()) == error_fields(expected["body"])


def test_patches_give_the_recorded_agents(sim):
    """In the recorded order, on one agent: required keys only (enable_reasoner flips on, the endpoint is
    lost), then whole configs, then metadata (replaced whole)."""
    agent_id = replay(sim, "create_agent").json()["id"]
    for name in ("patch_llm_config_required_keys", "patch_whole_configs", "patch_metadata"):
        answer = replay(sim, name, agent_id)
        assert answer.status_code == 200
        assert agent_fields(answer.json()) == agent_fields(recorded(name)["response"]["body"]), name


def test_a_patch_naming_an_unknown_tool_id_is_a_conflict(sim):
    agent_id = replay(sim, "create_agent").json()["id"]
    answer = replay(sim, "patch_unknown_tool_id", agent_id)
    assert answer.status_code == 409
    assert "ForeignKeyViolationError" in answer.json()["detail"]


def test_reads_lists_and_redirects_as_recorded(sim):
    agent_id = replay(sim, "create_agent").json()["id"]
    replay(sim, "create_agent")
    assert agent_fields(replay(sim, "get_agent", agent_id).json()) == agent_fields(
        recorded("get_agent")["response"]["body"]
    )
    for name in ("list_agents_without_slash",):
        answer, expected = replay(sim, name), recorded(name)["response"]
        assert (answer.status_code, answer.headers["location"]) == (expected["status"], expected["location"])
    assert len(replay(sim, "list_agents_page").json()) == 1
    tools = replay(sim, "list_tools").json()
    assert sorted(t["name"] for t in tools) == sorted(t["name"] for t in recorded("list_tools")["response"]["body"])
    assert replay(sim, "list_tools_by_name").json() == recorded("list_tools_by_name")["response"]["body"]
    blocks = replay(sim, "list_blocks", agent_id).json()
    expected = recorded("list_blocks")["response"]["body"]
    assert sorted((b["label"], b["value"], b["limit"], sorted(b)) for b in blocks) == sorted(
        (b["label"], b["value"], b["limit"], sorted(b)) for b in expected
    )


def test_lists_page_at_the_servers_default_sizes(sim):
    """Agents and tools page at 50, an agent's blocks at 100 (the server's `limit` defaults)."""
    body = recorded("create_agent")["request"]["body"]
    many = body | {"memory_blocks": [{"label": f"b{i}", "value": ""} for i in range(101)]}
    agent_id = httpx.post(f"{sim.url}/v1/agents/", json=many, headers=HEADERS).json()["id"]
    for _ in range(50):
        httpx.post(f"{sim.url}/v1/agents/", json=body, headers=HEADERS)
    assert len(httpx.get(f"{sim.url}/v1/agents/", headers=HEADERS).json()) == 50
    assert len(httpx.get(f"{sim.url}/v1/tools/?limit=100", headers=HEADERS).json()) == 26
    assert len(httpx.get(f"{sim.url}/v1/agents/{agent_id}/core-memory/blocks", headers=HEADERS).json()) == 100
    rest = httpx.get(
        f"{sim.url}/v1/agents/{agent_id}/core-memory/blocks",
        headers=HEADERS,
        params={
            "after": httpx.get(f"{sim.url}/v1/agents/{agent_id}/core-memory/blocks", headers=HEADERS).json()[-1]["id"]
        },
    ).json()
    assert len(rest) == 1


def test_export_and_import_as_recorded(sim):
    agent_id = replay(sim, "create_agent").json()["id"]
    exported, expected = replay(sim, "export_agent", agent_id).json(), recorded("export_agent")["response"]["body"]
    assert sorted(exported) == sorted(expected) and sorted(exported["agents"][0]) == sorted(expected["agents"][0])
    for key in ("tool_rules", "llm_config", "embedding_config", "block_ids", "tool_ids", "agent_type"):
        assert exported["agents"][0][key] == expected["agents"][0][key], key
    assert sorted((b["id"], b["label"], b["limit"]) for b in exported["blocks"]) == sorted(
        (b["id"], b["label"], b["limit"]) for b in expected["blocks"]
    )
    imported = replay(sim, "import_agent")
    assert imported.status_code == 200 and sorted(imported.json()) == ["agent_ids"]
    agent = httpx.get(f"{sim.url}/v1/agents/{imported.json()['agent_ids'][0]}", headers=HEADERS).json()
    assert agent_fields(agent) == agent_fields(recorded("get_imported_agent")["response"]["body"])
    assert agent["name"] == recorded("get_imported_agent")["response"]["body"]["name"]
