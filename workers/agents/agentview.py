"""What an upgrade compares and what it sends, as a Letta server sees an agent.

A Letta server fills every config object with its defaults (27 llm_config keys, 10 embedding_config
keys), adds fields to tool rules (`prompt_template: null`), may add tools and tool rules of its own, and
replaces a config object whole on PATCH. So an upgrade compares only what the template names, each
side normalised the way the server normalises it, and sends whole objects: the agent's current config
with the template's fields and the billing endpoints laid over it. Nothing the template does not name
changes (a partial llm_config PATCH let the server's defaults flip `enable_reasoner`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fleet.workers.agents.agentfile import UPGRADED_FIELDS, AgentFile

FLEET_METADATA_PREFIX = "fleet_"
# rules the server adds by itself: for base tools when asked to (include_base_tool_rules), and
# requires_approval for tools flagged so on the server
BASE_RULE_TYPES = ("exit_loop", "continue_loop")


def _rule(rule: dict, keys: set[str] | None = None) -> dict:
    """A rule without the server's empty fields; projected onto the template's keys when it has that rule."""
    clean = {k: v for k, v in rule.items() if v is not None}
    return {k: v for k, v in clean.items() if k in keys} if keys else clean


def _sorted_unique(rules: list[dict]) -> list[dict]:
    text = sorted({json.dumps(r, sort_keys=True) for r in rules})
    return [json.loads(t) for t in text]


def template_rules(template: AgentFile) -> list[dict]:
    return _sorted_unique([_rule(r.model_dump()) for r in template.agent.tool_rules])


def server_added_rule(rule: dict, template: AgentFile) -> bool:
    """A rule the template does not own: one the server added on its own for a tool the template has no
    such rule for. The template owns every other rule, so a rule dropped from a new version is removed."""
    owned = {(r.tool_name, r.type) for r in template.agent.tool_rules}
    if (rule.get("tool_name"), rule.get("type")) in owned:
        return False
    return rule.get("type") == "requires_approval" or (
        template.agent.include_base_tool_rules and rule.get("type") in BASE_RULE_TYPES
    )


def target_view(template: AgentFile, endpoint: str) -> dict[str, Any]:
    """What the template says, with both billing endpoints forced to the proxy."""
    a = template.agent
    tools = {t.id: t.name for t in template.tools}
    return {
        "system": a.system,
        "tools": sorted(tools[t] for t in a.tool_ids),
        "tool_rules": template_rules(template),
        "llm_config": dict(a.llm_config) | {"model_endpoint": endpoint},
        "embedding_config": dict(a.embedding_config) | {"embedding_endpoint": endpoint},
        "tags": sorted(a.tags),
        "metadata": _own_metadata(a.metadata),
    }


def agent_view(agent: dict, template: AgentFile, endpoint: str) -> dict[str, Any]:
    """The agent as the server returns it, cut down to what the template names."""
    target = target_view(template, endpoint)
    names = sorted(t["name"] for t in agent.get("tools") or [])
    if template.agent.include_base_tools:  # the server's base tools are its own: only the template's count
        names = [n for n in names if n in target["tools"]]
    keys = {(r.tool_name, r.type): set(r.model_dump(exclude_none=True)) for r in template.agent.tool_rules}
    rules = [
        _rule(r, keys.get((r.get("tool_name"), r.get("type"))))
        for r in agent.get("tool_rules") or []
        if not server_added_rule(r, template)
    ]
    llm, embedding, metadata = (
        (agent.get("llm_config") or {}),
        (agent.get("embedding_config") or {}),
        (agent.get("metadata") or {}),
    )
    return {
        "system": agent.get("system", ""),
        "tools": names,
        "tool_rules": _sorted_unique(rules),
        "llm_config": {k: llm.get(k) for k in target["llm_config"]},
        "embedding_config": {k: embedding.get(k) for k in target["embedding_config"]},
        "tags": sorted(agent.get("tags") or []),
        "metadata": {k: metadata.get(k) for k in target["metadata"]},
    }


def changes(agent: dict, template: AgentFile, endpoint: str) -> dict[str, dict[str, Any]]:
    """{field: {"from": ..., "to": ...}} for the fields where the agent differs from the template."""
    old, new = agent_view(agent, template, endpoint), target_view(template, endpoint)
    return {f: {"from": old[f], "to": new[f]} for f in UPGRADED_FIELDS if old[f] != new[f]}


def patch_body(
    agent: dict, template: AgentFile, endpoint: str, changed: dict, tool_id_of: Callable[[str], str]
) -> dict[str, Any]:
    """One PATCH for the changed fields: whole objects, the template's fields laid over the agent's."""
    target, body = target_view(template, endpoint), {}
    if "system" in changed:
        body["system"] = target["system"]
    for field in ("llm_config", "embedding_config"):
        if field in changed:
            body[field] = dict(agent.get(field) or {}) | target[field]
    if "tools" in changed:
        kept = [
            t["id"]
            for t in agent.get("tools") or []
            if template.agent.include_base_tools and t["name"] not in target["tools"]
        ]
        body["tool_ids"] = [tool_id_of(name) for name in target["tools"]] + kept
    if "tool_rules" in changed:
        kept_rules = [r for r in agent.get("tool_rules") or [] if server_added_rule(r, template)]
        body["tool_rules"] = target["tool_rules"] + kept_rules
    if "tags" in changed:
        body["tags"] = target["tags"]
    if "metadata" in changed:  # merged: the agent's other keys, the fleet's own among them, stay
        body["metadata"] = dict(agent.get("metadata") or {}) | target["metadata"]
    return body


def _own_metadata(metadata: dict) -> dict:
    """A template cannot overwrite the fleet's own keys (fleet_template, fleet_user_id)."""
    return {k: v for k, v in metadata.items() if not k.startswith(FLEET_METADATA_PREFIX)}
