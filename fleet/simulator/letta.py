"""The Letta 0.16 server's agents subset over HTTP: create, list, get, PATCH, core-memory blocks, tools,
export and import. Its behaviour comes from a real server's recorded answers (letta_recorded.py); the
agents live in memory (Simulator.agents), with a PATCH count per agent for the tests."""

from __future__ import annotations

import email.parser
import email.policy
import json
import time
import uuid
from typing import cast
from urllib.parse import parse_qs

from fleet.simulator import letta_agents as agents, letta_recorded as rec
from fleet.simulator.http import BaseHandler

COLLECTIONS = ("/v1/agents", "/v1/tools")


class LettaRoutes(BaseHandler):
    def route(self, method: str, body: dict | None) -> bool:
        path = self.path.split("?")[0]
        if path in COLLECTIONS or path.startswith(tuple(f"{c}/" for c in COLLECTIONS)):
            self.letta(method, body)
            return True
        return super().route(method, body)

    def letta(self, method: str, body: dict | None):
        entry = {"path": self.path, "method": method, "t": time.time(), "status": 200}
        time.sleep(self.sim.config.letta_latency_ms / 1000)
        status, payload = self._letta_answer(method, body)
        entry["status"] = status
        self.sim.record(entry)
        if status == 307:  # a collection path without its trailing slash
            self._send(307, b"", {"Location": payload})
        else:
            self._send(status, json.dumps(payload).encode())

    def _tools(self) -> dict[str, dict]:
        """The server's tools by name: the recorded catalogue, plus tools an import added."""
        with self.sim.lock:
            if self.sim.letta_tools is None:
                self.sim.letta_tools = dict(rec.tool_catalogue())
            return self.sim.letta_tools

    def _letta_answer(self, method: str, body: dict | None):
        if not self._auth_ok():
            return 401, {"detail": "Unauthorized"}
        fault = self.sim.next_fault()
        if isinstance(fault, int):
            return fault, {"detail": "simulated server failure"}
        path, _, query_text = self.path.partition("?")
        query = parse_qs(query_text)
        if path in COLLECTIONS:
            return 307, f"{path}/" + (f"?{query_text}" if query_text else "")
        parts = [p for p in path.split("/") if p]  # v1, agents|tools, [id], [core-memory, blocks | export]
        if parts[1] == "tools":
            return self._list_tools(method, parts, query)
        if len(parts) == 2:
            return self._collection(method, body, query)
        if parts[2] == "import" and method == "POST":
            return self._import()
        return self._one_agent(method, body, parts)

    def _list_tools(self, method: str, parts: list[str], query: dict):
        if method != "GET" or len(parts) != 2:
            return 405, {"detail": "Method Not Allowed"}
        return 200, agents.page(agents.name_filter(list(self._tools().values()), query), query, rec.PAGE["tools"])

    def _collection(self, method: str, body: dict | None, query: dict):
        if method == "GET":
            with self.sim.lock:
                found = agents.name_filter(list(self.sim.agents.values()), query)
            return 200, agents.page(found, query, rec.PAGE["agents"])
        if method != "POST":
            return 405, {"detail": "Method Not Allowed"}
        if body is None:
            return 422, rec.validation_error([{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error"}])
        status, agent = agents.create(self._tools(), body)
        if status == 200:
            with self.sim.lock:
                self.sim.agents[agent["id"]] = agent
        return status, agent

    def _one_agent(self, method: str, body: dict | None, parts: list[str]):
        agent_id = parts[2]
        if not agents.is_agent_id(agent_id):
            return agents.malformed_id(agent_id)
        with self.sim.lock:
            agent = self.sim.agents.get(agent_id)
        if agent is None:
            return 404, rec.detail("get_agent_unknown_id", "agent-00000000-0000-4000-8000-000000000000", agent_id)
        query = parse_qs(self.path.partition("?")[2])
        if method == "GET" and parts[3:] == ["core-memory", "blocks"]:
            return 200, agents.page(agent["memory"]["blocks"], query, rec.PAGE["blocks"])
        if method == "GET" and parts[3:] == ["export"]:
            return 200, agents.export(agent)
        if method == "GET" and len(parts) == 3:
            return 200, agent
        if method == "PATCH" and len(parts) == 3:
            return self._patch(agent, body)
        return 405, {"detail": "Method Not Allowed"}

    def _patch(self, agent: dict, body: dict | None):
        if body is None:
            return 422, rec.validation_error([{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error"}])
        tools_by_id = {t["id"]: t for t in self._tools().values()}
        with self.sim.lock:
            status, answer = agents.patch(agent, body, tools_by_id)
            if status == 200:
                self.sim.patches[agent["id"]] = self.sim.patches.get(agent["id"], 0) + 1
                if self.sim.config.alter_block_on_patch and agent["memory"]["blocks"]:
                    agent["memory"]["blocks"][0]["value"] += " (rewritten by the server)"
        return status, answer

    def _import(self):
        """POST /v1/agents/import: a multipart upload of an Agent File; the ids of the agents it made."""
        agent_file = self._uploaded_file()
        if agent_file is None:
            return 422, rec.validation_error([{"type": "missing", "loc": ("body", "file"), "msg": "Field required"}])
        problem = agents.import_problems(agent_file)
        if problem:
            return problem
        tools = self._tools()
        with self.sim.lock:
            for tool in agents.file_tools(agent_file):
                tools[tool["name"]] = (tools.get(tool["name"]) or {"id": f"tool-{uuid.uuid4()}"}) | tool
        created = []
        for spec in agent_file["agents"]:
            body = agents.import_body(agent_file, spec)
            body["name"] += rec.IMPORTED_NAME_SUFFIX
            status, agent = agents.create(tools, body)
            if status != 200:
                return 400, {"detail": f"Import failed: {agent.get('detail')}"}
            with self.sim.lock:
                self.sim.agents[agent["id"]] = agent
            created.append(agent["id"])
        return 200, {"agent_ids": created}

    def _uploaded_file(self) -> dict | None:
        ctype = self.headers.get("Content-Type", "")
        if not ctype.startswith("multipart/form-data"):
            return None
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {ctype}\r\n\r\n".encode() + (self.raw_body or b"")
        )
        for part in message.iter_parts():
            if part.get_param("name", header="content-disposition") == "file":
                try:
                    return json.loads(cast(bytes, part.get_payload(decode=True)))  # decoded: a leaf part's bytes
                except ValueError:
                    return None
        return None
