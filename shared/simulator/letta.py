"""The Letta 0.16 server's agents subset: create, list, get, PATCH, core-memory blocks, tools."""

from __future__ import annotations

import hashlib
import json
import time
from urllib.parse import parse_qs

from .http import BaseHandler

LLM_REQUIRED = ("model", "model_endpoint_type", "context_window")
EMBEDDING_REQUIRED = ("embedding_endpoint_type", "embedding_model", "embedding_dim")
_TOOL_NAMES: dict[str, str] = {}


def _tool_id(name: str) -> str:
    tool_id = "tool-" + hashlib.sha1(name.encode()).hexdigest()[:12]
    _TOOL_NAMES[tool_id] = name
    return tool_id


def _config_problems(config, required: tuple[str, ...], field: str) -> list[dict]:
    if not isinstance(config, dict):
        return [{"loc": ["body", field], "msg": "Field required", "type": "missing"}]
    return [{"loc": ["body", field, k], "msg": "Field required", "type": "missing"} for k in required if k not in config]


class LettaRoutes(BaseHandler):
    def route(self, method: str, body: dict | None) -> bool:
        path = self.path.split("?")[0].rstrip("/")
        if path.startswith(("/v1/agents", "/v1/tools")) and (method != "POST" or path == "/v1/agents"):
            self.letta(method, body)
            return True
        return super().route(method, body)

    def letta(self, method: str, body: dict | None):
        entry = {"path": self.path, "method": method, "t": time.time(), "status": 200}
        time.sleep(self.sim.config.letta_latency_ms / 1000)
        status, payload = self._letta_answer(method, body)
        entry["status"] = status
        self.sim.record(entry)
        self._send(status, json.dumps(payload).encode())

    def _letta_answer(self, method: str, body: dict | None):
        if not self._auth_ok():
            return 401, {"detail": "Unauthorized"}
        fault = self.sim.next_fault()
        if isinstance(fault, int):
            return fault, {"detail": "simulated server failure"}
        path, _, query = self.path.partition("?")
        parts = [p for p in path.split("/") if p]  # v1, agents, [id], [core-memory, blocks]
        if method == "GET" and parts[:2] == ["v1", "tools"]:
            from urllib.parse import parse_qs

            name = (parse_qs(query).get("name") or [""])[0]
            return 200, [{"id": _tool_id(name), "name": name}] if name else []
        if method == "GET" and len(parts) == 2:  # list, filtered by name
            from urllib.parse import parse_qs

            name = (parse_qs(query).get("name") or [None])[0]
            with self.sim.lock:
                return 200, [a for a in self.sim.agents.values() if name is None or a["name"] == name]
        if method == "POST":
            if body is None:
                return 422, {"detail": [{"msg": "invalid JSON body"}]}
            problems = _config_problems(body.get("llm_config"), LLM_REQUIRED, "llm_config") + _config_problems(
                body.get("embedding_config"), EMBEDDING_REQUIRED, "embedding_config")
            if problems:
                return 422, {"detail": problems}
            agent_id = f"agent-{hashlib.sha1(str(time.time_ns()).encode() + str(len(self.sim.agents)).encode()).hexdigest()[:12]}"
            blocks = [{"id": f"block-{agent_id[6:]}-{i}", "label": b.get("label"), "value": b.get("value", ""),
                       "limit": b.get("limit", 5000)} for i, b in enumerate(body.get("memory_blocks") or [])]
            agent = {"id": agent_id, "name": body.get("name"), "system": body.get("system", ""),
                     "llm_config": body["llm_config"], "embedding_config": body["embedding_config"],
                     "tools": [{"id": _tool_id(t), "name": t} for t in body.get("tools") or []],
                     "tool_rules": body.get("tool_rules") or [], "tags": body.get("tags") or [],
                     "metadata": body.get("metadata") or {}, "memory": {"blocks": blocks}}
            with self.sim.lock:
                self.sim.agents[agent_id] = agent
            return 200, agent
        agent_id = parts[2] if len(parts) > 2 else ""
        with self.sim.lock:
            agent = self.sim.agents.get(agent_id)
        if agent is None:
            return 404, {"detail": f"Agent id={agent_id} not found"}
        if method == "GET":
            if parts[3:] == ["core-memory", "blocks"]:
                return 200, agent["memory"]["blocks"]
            return 200, agent
        if body is None:
            return 422, {"detail": [{"msg": "invalid JSON body"}]}
        # a PATCH replaces llm_config and embedding_config whole: a partial object is refused
        problems = []
        if "llm_config" in body:
            problems += _config_problems(body["llm_config"], LLM_REQUIRED, "llm_config")
        if "embedding_config" in body:
            problems += _config_problems(body["embedding_config"], EMBEDDING_REQUIRED, "embedding_config")
        if problems:
            return 422, {"detail": problems}
        with self.sim.lock:
            for key in ("name", "system", "llm_config", "embedding_config", "tool_rules", "tags", "metadata"):
                if key in body:
                    agent[key] = body[key]
            if "tool_ids" in body:
                agent["tools"] = [{"id": t, "name": _TOOL_NAMES.get(t, t)} for t in body["tool_ids"]]
            self.sim.patches[agent_id] = self.sim.patches.get(agent_id, 0) + 1
            if self.sim.config.alter_block_on_patch and agent["memory"]["blocks"]:
                agent["memory"]["blocks"][0]["value"] += " (rewritten by the server)"
        return 200, agent
