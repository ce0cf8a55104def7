"""Creating agents from templates, with the billing invariant: every agent's model and embedding
endpoints go through the billing proxy, `{ZUPLO_BASE_URL}/api/v1/agents/{user_id}/messages`."""

from __future__ import annotations

from .agentfile import AgentFile
from .config import Settings
from .errors import PermanentError


class BillingNotConfigured(PermanentError):
    pass


def billing_endpoint(settings: Settings, user_id: str) -> str:
    if not settings.zuplo_base_url:
        raise BillingNotConfigured("ZUPLO_BASE_URL is not set: agents cannot be created or upgraded without the "
                                   "billing proxy")
    return f"{settings.zuplo_base_url.rstrip('/')}/api/v1/agents/{user_id}/messages"


def with_billing(template: AgentFile, endpoint: str) -> tuple[dict, dict]:
    """The template's whole llm_config and embedding_config with both endpoints forced to the proxy."""
    llm = dict(template.agent.llm_config) | {"model_endpoint": endpoint}
    embedding = dict(template.agent.embedding_config) | {"embedding_endpoint": endpoint}
    return llm, embedding


def create_body(template: AgentFile, name: str, user_id: str, endpoint: str, template_ref: str) -> dict:
    llm, embedding = with_billing(template, endpoint)
    tools = {t.id: t.name for t in template.tools}
    return {
        "name": name, "system": template.agent.system, "llm_config": llm, "embedding_config": embedding,
        "memory_blocks": template.initial_memory(), "tools": [tools[t] for t in template.agent.tool_ids],
        "tool_rules": [r.model_dump() for r in template.agent.tool_rules], "tags": template.agent.tags,
        "metadata": template.agent.metadata | {"fleet_template": template_ref, "fleet_user_id": user_id},
    }
