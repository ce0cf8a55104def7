"""Creating agents from templates, with the billing invariant: every agent's model and embedding
endpoints go through the billing proxy, `{ZUPLO_BASE_URL}/api/v1/agents/{user_id}/messages`."""

from __future__ import annotations

from fleet.shared.config import Settings
from fleet.shared.errors import PermanentError
from fleet.workers.agents.agentfile import AgentFile
from fleet.workers.agents.agentview import target_view


class BillingNotConfigured(PermanentError):
    pass


def billing_endpoint(settings: Settings, user_id: str) -> str:
    if not settings.zuplo_base_url:
        raise BillingNotConfigured(
            "ZUPLO_BASE_URL is not set: agents cannot be created or upgraded without the billing proxy"
        )
    return f"{settings.zuplo_base_url.rstrip('/')}/api/v1/agents/{user_id}/messages"


def create_body(template: AgentFile, name: str, user_id: str, endpoint: str, template_ref: str) -> dict:
    """The create request: the template's agent as it says, billing endpoints forced. `agent_type`,
    `include_base_tools` and `include_base_tool_rules` are always sent, or the server's defaults
    replace the template's tools with its own and add rules the template did not ask for."""
    target, agent = target_view(template, endpoint), template.agent
    tools = {t.id: t.name for t in template.tools}
    body = {
        "name": name,
        "system": agent.system,
        "llm_config": target["llm_config"],
        "embedding_config": target["embedding_config"],
        "memory_blocks": template.initial_memory(),
        "tools": [tools[t] for t in agent.tool_ids],
        "tool_rules": target["tool_rules"],
        "tags": agent.tags,
        "include_base_tools": agent.include_base_tools,
        "include_base_tool_rules": agent.include_base_tool_rules,
        "metadata": target["metadata"] | {"fleet_template": template_ref, "fleet_user_id": user_id},
    }
    return body | ({"agent_type": agent.agent_type} if agent.agent_type else {})
