"""Letta Agent Files (.af) as templates: the pydantic model, validation with clear reasons, and diffs.

A template holds exactly one agent. Its memory blocks are the initial memory of a new agent and
are never applied by an upgrade; everything else (system prompt, tools, tool rules, llm and
embedding config, tags, metadata) is what an upgrade moves an agent to.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fleet.shared.errors import describe

SECRET_KEY = re.compile(r"(?i)(api[_-]?key|secret|password|passwd|token|authorization|credential)")
SECRET_VALUE = re.compile(r"\bsk-[A-Za-z0-9_-]{16,}|(?i:bearer\s+[A-Za-z0-9._~+/=-]{16,})")
BLOCK_OPTIONAL_FIELDS = ("description", "read_only")  # kept from a Letta export when present
UPGRADED_FIELDS = ("system", "tools", "tool_rules", "llm_config", "embedding_config", "tags", "metadata")


class InvalidAgentFile(ValueError):
    pass


class Block(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    label: str
    value: str = ""
    limit: int | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    name: str


class ToolRule(BaseModel):
    model_config = ConfigDict(extra="allow")
    tool_name: str
    type: str


class AgentSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    system: str = ""
    # None: the server's default type. A template's tools are the agent's tools unless it asks for the
    # server's base tools; the server's own tool rules likewise only when asked (Letta's exports say both).
    agent_type: str | None = None
    include_base_tools: bool = False
    include_base_tool_rules: bool = False
    llm_config: dict[str, Any]
    embedding_config: dict[str, Any]
    block_ids: list[str] = Field(default_factory=list)
    tool_ids: list[str] = Field(default_factory=list)
    tool_rules: list[ToolRule] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)


class AgentFile(BaseModel):
    model_config = ConfigDict(extra="allow")
    agents: list[AgentSpec]
    blocks: list[Block] = Field(default_factory=list)
    tools: list[Tool] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> AgentFile:
        if len(self.agents) != 1:
            raise ValueError(f"a template holds exactly one agent, this file has {len(self.agents)}")
        agent = self.agents[0]
        blocks, tools = {b.id for b in self.blocks}, {t.id: t.name for t in self.tools}
        missing_blocks = [b for b in agent.block_ids if b not in blocks]
        if missing_blocks:
            raise ValueError(f"the agent refers to blocks this file does not define: {', '.join(missing_blocks)}")
        missing_tools = [t for t in agent.tool_ids if t not in tools]
        if missing_tools:
            raise ValueError(f"the agent refers to tools this file does not define: {', '.join(missing_tools)}")
        names = {tools[t] for t in agent.tool_ids}
        unknown_rules = sorted({r.tool_name for r in agent.tool_rules} - names)
        if unknown_rules:
            raise ValueError(f"tool rules name tools the agent does not have: {', '.join(unknown_rules)}")
        return self

    @property
    def agent(self) -> AgentSpec:
        return self.agents[0]

    def upgrade_view(self) -> dict[str, Any]:
        """The fields an upgrade applies (memory blocks are not among them)."""
        a = self.agent
        tools = {t.id: t.name for t in self.tools}
        return {
            "system": a.system,
            "tools": sorted(tools[t] for t in a.tool_ids),
            "tool_rules": sorted((r.model_dump() for r in a.tool_rules), key=lambda r: (r["tool_name"], r["type"])),
            "llm_config": a.llm_config,
            "embedding_config": a.embedding_config,
            "tags": sorted(a.tags),
            "metadata": a.metadata,
        }

    def initial_memory(self) -> list[dict[str, Any]]:
        """The memory blocks of a new agent. A block without a limit gets the server's default: Letta
        answers 422 to `"limit": null`, so the key is left out rather than sent empty."""
        by_id = {b.id: b for b in self.blocks}
        blocks = []
        for block_id in self.agent.block_ids:
            block = by_id[block_id]
            fields = {"label": block.label, "value": block.value, "limit": block.limit}
            fields |= {k: getattr(block, k, None) for k in BLOCK_OPTIONAL_FIELDS}
            blocks.append({k: v for k, v in fields.items() if v is not None})
        return blocks


def find_secrets(value: Any, path: str = "") -> list[str]:
    """Paths of values that look like credentials: a template is shared, a secret must not be in it."""
    found = []
    if isinstance(value, dict):
        for k, v in value.items():
            here = f"{path}.{k}" if path else str(k)
            if SECRET_KEY.search(str(k)) and isinstance(v, str) and v.strip():
                found.append(here)
            else:
                found += find_secrets(v, here)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += find_secrets(v, f"{path}[{i}]")
    elif isinstance(value, str) and SECRET_VALUE.search(value):
        found.append(path)
    return found


def parse_agent_file(content: Any) -> AgentFile:
    """Validate a template; InvalidAgentFile says why it is refused."""
    if not isinstance(content, dict):
        raise InvalidAgentFile("an agent file is a JSON object")
    secrets = find_secrets(content)
    if secrets:
        raise InvalidAgentFile(
            f"the file contains secret values (at {', '.join(secrets[:5])}); "
            "templates are shared: pass credentials to the server, not in the file"
        )
    try:
        return AgentFile.model_validate(content)
    except ValidationError as e:
        raise InvalidAgentFile(describe(e)) from None


def diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Field-level differences {field: {"from": ..., "to": ...}} between two upgrade views."""
    return {f: {"from": old.get(f), "to": new.get(f)} for f in UPGRADED_FIELDS if old.get(f) != new.get(f)}


# A Letta Agent File holds these lists even when empty; POST /v1/agents/import refuses a file without them.
LETTA_FILE_LISTS = ("groups", "files", "sources", "mcp_servers", "skills")
AGENT_FILE_LISTS = ("in_context_message_ids", "messages", "files_agents", "group_ids")


def needs_definition(tool: Tool) -> bool:
    """A tool named only: the server's tool of that name. Letta imports a tool from its full definition."""
    return not (tool.model_extra or {}).get("tool_type") and not (tool.model_extra or {}).get("source_code")


def to_letta_file(template: AgentFile, definitions: dict[str, dict]) -> dict[str, Any]:
    """The template as an Agent File that `POST /v1/agents/import` accepts: Letta's file ids
    (agent-0, block-N, tool-N), every list it requires, each tool's full definition (from `definitions`,
    by name, for tools the template names only), string metadata."""
    block_ids = {b.id: f"block-{i}" for i, b in enumerate(template.blocks)}
    tool_ids = {t.id: f"tool-{i}" for i, t in enumerate(template.tools)}
    agent = template.agent.model_dump(exclude_none=True) | {
        "id": "agent-0",
        "block_ids": [block_ids[b] for b in template.agent.block_ids],
        "tool_ids": [tool_ids[t] for t in template.agent.tool_ids],
    }
    agent |= {k: agent.get(k) or [] for k in AGENT_FILE_LISTS}
    blocks = [b.model_dump(exclude_none=True) | {"id": block_ids[b.id]} for b in template.blocks]
    tools = []
    for tool in template.tools:
        body = definitions[tool.name] if needs_definition(tool) else tool.model_dump()
        tools.append(
            {k: v for k, v in body.items() if k not in ("id", "created_by_id", "last_updated_by_id")}
            | {"id": tool_ids[tool.id]}
        )
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in template.metadata.items()}
    return {
        "agents": [agent],
        "blocks": blocks,
        "tools": tools,
        **{k: [] for k in LETTA_FILE_LISTS},
        "metadata": metadata,
    }
