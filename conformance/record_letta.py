"""Re-records the real Letta answers the simulator is built from (tests/fixtures/letta/*.json).

    bash conformance/install_letta.sh                         # once: the server into the cache
    .venv/bin/python -m conformance.record_letta              # starts a Letta 0.16.8 from the cache
    .venv/bin/python -m conformance.record_letta --url URL    # or records from a running server

Each fixture is one exchange: the request (method, path, body) and the server's answer (status, the
Location header of a redirect, the JSON body). Requests are the fleet's own where the fleet makes them
(the create body comes from fleet.workers.agents.creation.create_body).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path
from typing import Any

import httpx

from fleet.workers.agents.agentfile import parse_agent_file
from fleet.workers.agents.creation import create_body
from tests.test_templates import AGENT

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "letta"
ENDPOINT = "https://billing.example.test/api/v1/agents/00000000-0000-4000-8000-000000000001/messages"
UNKNOWN_AGENT = "agent-00000000-0000-4000-8000-000000000000"
UNKNOWN_TOOL = "tool-00000000-0000-4000-8000-000000000000"
# the tests' template, with a block that names no limit (the server's default applies)
TEMPLATE = copy.deepcopy(AGENT) | {"metadata": {"source": "recording"}}
TEMPLATE["blocks"][1].pop("limit")


class Recorder:
    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=60)
        self.count = 0

    def __call__(self, name: str, method: str, path: str, body: Any = None, **request: Any) -> Any:
        response = self.http.request(method, path, json=body, **request)
        answer = {"status": response.status_code, "body": response.json() if response.content else None}
        if "location" in response.headers:
            answer["location"] = response.headers["location"].replace(str(self.http.base_url).rstrip("/"), "")
        exchange = {"request": {"method": method, "path": path, "body": body}, "response": answer}
        (FIXTURES / f"{name}.json").write_text(json.dumps(exchange, indent=1, sort_keys=True) + "\n")
        self.count += 1
        return answer["body"]


def fleet_create_body(name: str) -> dict:
    return create_body(
        parse_agent_file(TEMPLATE), name, "00000000-0000-4000-8000-000000000001", ENDPOINT, "support@1.0.0"
    )


def record_creates(rec: Recorder) -> dict:
    agent = rec("create_agent", "POST", "/v1/agents/", fleet_create_body("recorded-fleet"))
    # the server's defaults when the body says nothing of agent_type, base tools and base tool rules
    defaults = {
        k: v
        for k, v in fleet_create_body("recorded-defaults").items()
        if k not in ("agent_type", "include_base_tools", "include_base_tool_rules")
    }
    rec("create_agent_server_defaults", "POST", "/v1/agents/", defaults)
    rec(
        "create_agent_memgpt_v2_base_tools",
        "POST",
        "/v1/agents/",
        fleet_create_body("recorded-memgpt-v2")
        | {
            "agent_type": "memgpt_v2_agent",
            "include_base_tools": True,
            "include_base_tool_rules": True,
            "tools": [],
            "tool_rules": [],
        },
    )
    base = {
        "name": "recorded-refused",
        "llm_config": agent["llm_config"],
        "embedding_config": agent["embedding_config"],
        "include_base_tools": False,
    }
    rec("create_unknown_tool", "POST", "/v1/agents/", base | {"tools": ["no_such_tool"]})
    rec(
        "create_null_block_limit",
        "POST",
        "/v1/agents/",
        base | {"memory_blocks": [{"label": "x", "value": "", "limit": None}]},
    )
    rec(
        "create_unknown_tool_rule_type",
        "POST",
        "/v1/agents/",
        base | {"tools": ["send_message"], "tool_rules": [{"tool_name": "send_message", "type": "no_such_rule"}]},
    )
    rec("create_without_configs", "POST", "/v1/agents/", {"name": "recorded-no-configs"})
    return agent


def record_reads(rec: Recorder, agent: dict) -> None:
    rec("get_agent", "GET", f"/v1/agents/{agent['id']}")
    rec("get_agent_malformed_id", "GET", "/v1/agents/not-an-agent-id")
    rec("get_agent_unknown_id", "GET", f"/v1/agents/{UNKNOWN_AGENT}")
    rec("list_agents_without_slash", "GET", "/v1/agents")
    rec("list_agents_by_name", "GET", "/v1/agents/?name=recorded-fleet")
    rec("list_agents_page", "GET", "/v1/agents/?limit=1")
    rec("list_tools", "GET", "/v1/tools/")
    rec("list_tools_by_name", "GET", "/v1/tools/?name=send_message")
    rec("list_blocks", "GET", f"/v1/agents/{agent['id']}/core-memory/blocks")
    rec("export_agent", "GET", f"/v1/agents/{agent['id']}/export")


def record_patches(rec: Recorder, agent: dict) -> None:
    llm = agent["llm_config"]
    rec("patch_partial_llm_config", "PATCH", f"/v1/agents/{agent['id']}", {"llm_config": {"model": "gpt-4o"}})
    # the required keys only: the server fills the rest with its PATCH defaults (enable_reasoner flips to true)
    minimal = {k: llm[k] for k in ("model", "model_endpoint_type", "context_window")} | {"model": "gpt-4o"}
    rec("patch_llm_config_required_keys", "PATCH", f"/v1/agents/{agent['id']}", {"llm_config": minimal})
    whole = copy.deepcopy(agent)
    rec(
        "patch_whole_configs",
        "PATCH",
        f"/v1/agents/{agent['id']}",
        {
            "llm_config": whole["llm_config"] | {"model": "gpt-4o"},
            "embedding_config": whole["embedding_config"],
            "system": "You help customers, briefly.",
            "tags": ["support", "v2"],
            "metadata": whole["metadata"] | {"source": "recording-v2"},
        },
    )
    rec("patch_unknown_tool_id", "PATCH", f"/v1/agents/{agent['id']}", {"tool_ids": [UNKNOWN_TOOL]})
    rec("patch_malformed_tool_id", "PATCH", f"/v1/agents/{agent['id']}", {"tool_ids": ["t1"]})
    rec("patch_metadata", "PATCH", f"/v1/agents/{agent['id']}", {"metadata": {"source": "replaced"}})


def record_import(rec: Recorder, name: str, agent_file: dict) -> None:
    """POST /v1/agents/import takes the file as a multipart upload; the fixture keeps the file as its body."""
    files = {"file": ("agent.af", json.dumps(agent_file), "application/json")}
    response = rec.http.post("/v1/agents/import", files=files)
    exchange = {
        "request": {"method": "POST", "path": "/v1/agents/import", "body": agent_file, "multipart": "file"},
        "response": {"status": response.status_code, "body": response.json()},
    }
    (FIXTURES / f"{name}.json").write_text(json.dumps(exchange, indent=1, sort_keys=True) + "\n")
    rec.count += 1


def record(url: str) -> int:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    rec = Recorder(url)
    agent = record_creates(rec)
    record_reads(rec, agent)
    record_patches(rec, agent)
    exported = json.loads((FIXTURES / "export_agent.json").read_text())["response"]["body"]
    record_import(rec, "import_agent", exported | {"agents": [exported["agents"][0] | {"name": "recorded-imported"}]})
    imported = json.loads((FIXTURES / "import_agent.json").read_text())["response"]["body"]["agent_ids"][0]
    rec("get_imported_agent", "GET", f"/v1/agents/{imported}")
    record_import(rec, "import_fleet_template_as_is", TEMPLATE)  # refused: not a Letta Agent File
    lists = {k: [] for k in ("groups", "files", "sources", "mcp_servers")}
    with_id = {"agents": [TEMPLATE["agents"][0] | {"id": "agent-0"}]}
    record_import(rec, "import_wrong_id_format", TEMPLATE | lists | with_id)
    return rec.count


def main() -> int:
    p = argparse.ArgumentParser(
        prog="python -m conformance.record_letta",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", default=os.environ.get("LETTA_API_BASE_URL"), help="a running Letta 0.16.8 server")
    url = p.parse_args().url
    server = None
    if not url:
        from .letta_server import LettaServer

        cache = Path(os.environ.get("FLEET_CONFORMANCE_CACHE", Path.home() / ".cache" / "fleet-conformance"))
        server = LettaServer(cache)
        url = server.start()
    try:
        print(f"recorded {record(url)} exchanges from {url} into {FIXTURES}")
    finally:
        if server:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
