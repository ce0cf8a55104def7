"""The simulated Letta server's agents: create, PATCH, export and import, as a real Letta 0.16.8 server
does them (every default, shape and error body from its recorded answers, see letta_recorded.py).
Each function returns (status, body)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from fleet.simulator import letta_recorded as rec

Answer = tuple[int, Any]
FILE_ID_PREFIX = {"agents": "agent-", "blocks": "block-", "tools": "tool-"}


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _missing(config: Any, required: tuple[str, ...], field: str) -> list[dict]:
    config = config if isinstance(config, dict) else {}
    return [rec.error_like("patch_partial_llm_config", ("body", field, k), config) for k in required if k not in config]


def _rule_errors(rules: list[dict] | None) -> list[dict]:
    return [
        rec.error_like("create_unknown_tool_rule_type", ("body", "tool_rules", i), r.get("type"), "no_such_rule")
        | {"input": r}
        for i, r in enumerate(rules or [])
        if r.get("type") not in rec.rule_types()
    ]


def create_errors(body: dict) -> list[dict]:
    errors = [
        rec.error_like("create_null_block_limit", ("body", "memory_blocks", i, "limit"), None)
        for i, b in enumerate(body.get("memory_blocks") or [])
        if "limit" in b and b["limit"] is None
    ]
    errors += _rule_errors(body.get("tool_rules"))
    errors += _missing(body.get("llm_config"), rec.LLM_REQUIRED, "llm_config")
    return errors + _missing(body.get("embedding_config"), rec.EMBEDDING_REQUIRED, "embedding_config")


def _rule(rule: dict) -> dict:
    return {k: v for k, v in rule.items() if k != "prompt_template"} | {"prompt_template": rule.get("prompt_template")}


def _tool_names(body: dict, agent_type: str) -> set[str] | Answer:
    names = set(body.get("tools") or [])
    if body.get("include_base_tools", True):
        if agent_type not in rec.base_tools():
            return 400, {"detail": f"the simulator has no recorded base tools for agent_type {agent_type!r}"}
        names |= rec.base_tools()[agent_type]
        if agent_type == "letta_v1_agent":
            names.discard("send_message")
    return names


def _tool_rules(body: dict, agent_type: str, names: set[str]) -> list[dict]:
    rules = [_rule(r) for r in body.get("tool_rules") or []]
    add_base = body.get("include_base_tool_rules")
    if agent_type == "letta_v1_agent" and body.get("include_base_tools", True) and not rules and add_base is None:
        add_base = False  # a v1 agent gets no base rules unless it asks
    if add_base is not False:
        rules += [
            _rule({"tool_name": n, "type": rec.base_rule_types()[n]})
            for n in sorted(names)
            if n in rec.base_rule_types()
        ]
    return rules


def _configs(body: dict, agent_type: str) -> tuple[dict, dict]:
    llm_defaults, embedding_defaults = rec.create_defaults(agent_type)
    llm = {k: body["llm_config"].get(k, v) for k, v in llm_defaults.items()}
    if agent_type == "letta_v1_agent":
        llm["put_inner_thoughts_in_kwargs"] = False
    return llm, {k: body["embedding_config"].get(k, v) for k, v in embedding_defaults.items()}


def _block(given: dict) -> dict:
    block = rec.block_skeleton(given.get("label", ""))
    fields = {k: given[k] for k in ("value", "limit", "description", "read_only", "metadata") if k in given}
    return block | {"limit": rec.block_default_limit()} | fields | {"id": f"block-{uuid.uuid4()}"}


def create(tools: dict[str, dict], body: dict) -> Answer:
    """POST /v1/agents/: an agent as the server builds it from the request."""
    if not body.get("llm_config") and not body.get("model"):
        return 400, rec.answer("create_without_configs")
    errors = create_errors(body)
    if errors:
        return 422, rec.validation_error(errors)
    agent_type = body.get("agent_type") or "letta_v1_agent"
    names = _tool_names(body, agent_type)
    if isinstance(names, tuple):
        return names
    unknown = names - set(tools)
    if unknown:
        return 400, rec.detail("create_unknown_tool", "{'no_such_tool'}", repr(unknown))
    llm, embedding = _configs(body, agent_type)
    blocks = [_block(b) for b in body.get("memory_blocks") or []]
    skeleton = rec.agent_skeleton()
    agent = skeleton | {
        "id": f"agent-{uuid.uuid4()}",
        "name": body.get("name") or "agent",
        "system": body.get("system") or "",
        "agent_type": agent_type,
        "llm_config": llm,
        "embedding_config": embedding,
        "tools": [tools[n] for n in sorted(names)],
        "tool_rules": _tool_rules(body, agent_type, names),
        "tags": body.get("tags") or [],
        "metadata": body.get("metadata") or {},
        "blocks": blocks,
        "memory": skeleton["memory"] | {"blocks": blocks},
        "created_at": _now(),
        "updated_at": _now(),
    }
    return 200, agent


def _patch_errors(body: dict, tools_by_id: dict[str, dict]) -> Answer | None:
    errors = _rule_errors(body.get("tool_rules")) if "tool_rules" in body else []
    if "llm_config" in body:
        errors += _missing(body["llm_config"], rec.LLM_REQUIRED, "llm_config")
    if "embedding_config" in body:
        errors += _missing(body["embedding_config"], rec.EMBEDDING_REQUIRED, "embedding_config")
    errors += [
        rec.error_like("patch_malformed_tool_id", ("body", "tool_ids", i), t)
        for i, t in enumerate(body.get("tool_ids") or [])
        if len(t) < 41
    ]
    if errors:
        return 422, rec.validation_error(errors)
    unknown = [t for t in body.get("tool_ids") or [] if t not in tools_by_id]
    if unknown:  # the server's foreign key refuses the row: 409
        return 409, rec.detail("patch_unknown_tool_id", rec.UNKNOWN_TOOL, unknown[0])
    return None


def patch(agent: dict, body: dict, tools_by_id: dict[str, dict]) -> Answer:
    """PATCH /v1/agents/{id}: config objects are replaced whole, missing keys take the PATCH defaults."""
    refused = _patch_errors(body, tools_by_id)
    if refused:
        return refused
    if "llm_config" in body:
        agent["llm_config"] = {k: body["llm_config"].get(k, v) for k, v in rec.patch_llm_defaults().items()}
    if "embedding_config" in body:
        defaults = rec.create_defaults(agent["agent_type"])[1]
        agent["embedding_config"] = {k: body["embedding_config"].get(k, v) for k, v in defaults.items()}
    if "tool_rules" in body:
        agent["tool_rules"] = [_rule(r) for r in body["tool_rules"]]
    if "tool_ids" in body:
        agent["tools"] = [tools_by_id[t] for t in body["tool_ids"]]
    for key in ("name", "system", "tags", "metadata"):
        if key in body:
            agent[key] = body[key]
    agent["updated_at"] = _now()
    return 200, agent


def export(agent: dict) -> dict:
    """GET /v1/agents/{id}/export: the agent as a Letta Agent File, file ids in the server's format."""
    skeleton = rec.export_skeleton()
    blocks = [
        {k: v for k, v in b.items() if k not in ("id", "created_by_id", "last_updated_by_id")} | {"id": f"block-{i}"}
        for i, b in enumerate(agent["memory"]["blocks"])
    ]
    tools = [
        {k: v for k, v in t.items() if k not in ("id", "created_by_id", "last_updated_by_id")} | {"id": f"tool-{i}"}
        for i, t in enumerate(agent["tools"])
    ]
    fields = {
        k: agent[k]
        for k in ("name", "system", "agent_type", "llm_config", "embedding_config", "tool_rules", "tags", "metadata")
    }
    exported = (
        skeleton["agents"][0] | fields | {"block_ids": [b["id"] for b in blocks], "tool_ids": [t["id"] for t in tools]}
    )
    return skeleton | {"agents": [exported], "blocks": blocks, "tools": tools, "created_at": _now()}


def import_problems(agent_file: dict) -> Answer | None:
    """The server's checks of an Agent File before it creates anything (400, as it answers)."""
    missing = [k for k in ("groups", "files", "sources", "mcp_servers") if k not in agent_file]
    missing = [f"agents.{i}.id" for i, a in enumerate(agent_file.get("agents") or []) if "id" not in a] + missing
    if missing:
        lines = "\n".join(f"{loc}\n  Field required [type=missing]" for loc in missing)
        return 400, {"detail": f"{len(missing)} validation errors for AgentFileSchema\n{lines}"}
    wrong = [
        f"Invalid ID format: {item['id']} should start with {prefix!r}"
        for key, prefix in FILE_ID_PREFIX.items()
        for item in agent_file.get(key) or []
        if not str(item.get("id", "")).startswith(prefix)
    ]
    if wrong:
        return 400, {"detail": f"Import failed: Schema validation failed: {'; '.join(wrong)}"}
    custom = [t for t in agent_file.get("tools") or [] if not t.get("tool_type") and not t.get("source_code")]
    if custom:
        return 400, {"detail": "Import failed: Custom tool is missing source_code field."}
    return None


def import_body(agent_file: dict, spec: dict) -> dict:
    """The create request the server makes of one agent of an Agent File (its tools and blocks by file id)."""
    tools = {t["id"]: t["name"] for t in agent_file["tools"]}
    blocks = {b["id"]: b for b in agent_file["blocks"]}
    body = {k: v for k, v in spec.items() if k not in ("id", "tool_ids", "block_ids", "memory_blocks", "tools")}
    return body | {
        "tools": [tools[t] for t in spec.get("tool_ids") or []],
        "memory_blocks": [blocks[b] for b in spec.get("block_ids") or []],
    }


def file_tools(agent_file: dict) -> list[dict]:
    """The file's tools as the server upserts them (by name), without their file ids."""
    return [{k: v for k, v in t.items() if k != "id"} for t in agent_file.get("tools") or []]


def is_agent_id(text: str) -> bool:
    return bool(rec.ID_PATTERN.match(text))


def malformed_id(agent_id: str) -> Answer:
    error = rec.error_like("get_agent_malformed_id", ("path", "agent_id"), agent_id)
    return 422, rec.validation_error([error], "get_agent_malformed_id")


def page(items: list[dict], query: dict[str, list[str]], default_limit: int) -> list[dict]:
    """`limit` and the `after` cursor, as the server pages its lists."""
    limits, afters = query.get("limit"), query.get("after")
    limit = int(limits[0]) if limits else default_limit
    after = afters[0] if afters else None
    if after:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    return items[:limit]


def name_filter(items: list[dict], query: dict[str, list[str]]) -> list[dict]:
    names = query.get("name")
    name = names[0] if names else None
    return [i for i in items if name is None or i["name"] == name]
