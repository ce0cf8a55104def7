"""Letta REST client (the 0.16 server line): create, read and patch agents, read core memory blocks,
tools, export and import Agent Files. Same error classes and bounded retries as the other providers.

What the server means by its statuses: 400 (unknown tool names, a create without configs), 404 and
422 (a malformed id or body) are permanent; so is 409, a foreign-key failure such as a PATCH naming a
tool id the server does not have: retrying the same request cannot succeed. List endpoints page
(agents and tools 50, an agent's blocks 100) and collection paths need their trailing slash (307).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import httpx

from fleet.shared.config import Settings, get_settings
from fleet.shared.errors import PermanentError, ProviderError
from fleet.shared.providers.http import bearer, call_with_retries, http_client, raise_for_provider

PROVIDER = "letta"
PERMANENT_STATUS = {409}  # transient for other providers (a conflict that may clear), never for Letta
PAGE = {"agents": 50, "tools": 50, "blocks": 100}  # the server's default page sizes


class LettaNotConfigured(PermanentError):
    pass


def raise_for_letta(response: httpx.Response) -> None:
    try:
        raise_for_provider(PROVIDER, response)
    except ProviderError as e:
        if e.status in PERMANENT_STATUS:
            e.kind = "permanent"
        raise


class LettaClient:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        if not self.settings.letta_api_base_url:
            raise LettaNotConfigured("LETTA_API_BASE_URL is not set")

    @property
    def client(self) -> httpx.Client:
        url = self.settings.letta_api_base_url
        assert url  # checked in __init__
        return http_client(url, timeout_s=30.0)

    def _headers(self) -> dict[str, Any]:
        return bearer(self.settings.letta_api_key.get_secret_value() if self.settings.letta_api_key else None)

    def _call(self, method: str, path: str, body: dict | None = None, **request: Any) -> Any:
        def send():
            response = self.client.request(method, path, json=body, headers=self._headers(), **request)
            raise_for_letta(response)
            return response.json()

        return call_with_retries(send, provider=PROVIDER, max_retries=self.settings.letta_max_retries)

    def _list(self, path: str, page: int, **query: str) -> list[dict]:
        """Every item of a paged list, following the `after` cursor while pages come back full."""
        items: list[dict] = []
        while True:
            params = query | {"limit": str(page)} | ({"after": items[-1]["id"]} if items else {})
            batch = self._call("GET", f"{path}?{urlencode(params)}")
            items += batch
            if len(batch) < page:
                return items

    def create_agent(self, body: dict) -> dict:
        return self._call("POST", "/v1/agents/", body)

    def find_agents(self, name: str) -> list[dict]:
        return self._list("/v1/agents/", PAGE["agents"], name=name)

    def find_tool(self, name: str) -> dict:
        tools = self._call("GET", f"/v1/tools/?{urlencode({'name': name})}")
        if not tools:
            raise PermanentError(f"the Letta server has no tool named {name!r}")
        return tools[0]

    def find_tool_id(self, name: str) -> str:
        return self.find_tool(name)["id"]

    def get_agent(self, agent_id: str) -> dict:
        return self._call("GET", f"/v1/agents/{agent_id}")

    def update_agent(self, agent_id: str, body: dict) -> dict:
        return self._call("PATCH", f"/v1/agents/{agent_id}", body)

    def blocks(self, agent_id: str) -> list[dict]:
        return self._list(f"/v1/agents/{agent_id}/core-memory/blocks", PAGE["blocks"])

    def export_agent(self, agent_id: str) -> dict:
        return self._call("GET", f"/v1/agents/{agent_id}/export")

    def import_agent(self, agent_file: dict) -> list[str]:
        """The ids of the agents the server created from an Agent File."""
        files = {"file": ("agent.af", json.dumps(agent_file), "application/json")}
        return self._call("POST", "/v1/agents/import", files=files)["agent_ids"]
