"""Letta REST client (the 0.16 server line): create, read and patch agents, read core memory blocks.
Same error classes and bounded retries as the other providers."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from ..config import Settings, get_settings
from ..errors import PermanentError
from .http import bearer, call_with_retries, http_client, raise_for_provider

PROVIDER = "letta"


class LettaNotConfigured(PermanentError):
    pass


class LettaClient:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        if not self.settings.letta_api_base_url:
            raise LettaNotConfigured("LETTA_API_BASE_URL is not set")

    @property
    def client(self) -> httpx.Client:
        return http_client(self.settings.letta_api_base_url, timeout_s=30.0)

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        key = self.settings.letta_api_key.get_secret_value() if self.settings.letta_api_key else None

        def request():
            response = self.client.request(method, path, json=body, headers=bearer(key))
            raise_for_provider(PROVIDER, response)
            return response.json()

        return call_with_retries(request, provider=PROVIDER, max_retries=self.settings.letta_max_retries)

    def create_agent(self, body: dict) -> dict:
        return self._call("POST", "/v1/agents/", body)

    def find_agents(self, name: str) -> list[dict]:
        return self._call("GET", f"/v1/agents/?name={quote(name)}")

    def find_tool_id(self, name: str) -> str:
        tools = self._call("GET", f"/v1/tools/?name={quote(name)}")
        if not tools:
            raise PermanentError(f"the Letta server has no tool named {name!r}")
        return tools[0]["id"]

    def get_agent(self, agent_id: str) -> dict:
        return self._call("GET", f"/v1/agents/{agent_id}")

    def update_agent(self, agent_id: str, body: dict) -> dict:
        return self._call("PATCH", f"/v1/agents/{agent_id}", body)

    def blocks(self, agent_id: str) -> list[dict]:
        return self._call("GET", f"/v1/agents/{agent_id}/core-memory/blocks")
