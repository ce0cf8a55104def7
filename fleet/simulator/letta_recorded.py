"""What the simulated Letta server knows, all of it taken from a real Letta 0.16.8 server's recorded
answers (tests/fixtures/letta/, re-recorded by `python -m conformance.record_letta`): the shapes of an
agent, a block and an export, the defaults the server fills into config objects on create and on PATCH,
its tool catalogue, the base tools and tool rules it adds, the rule types it accepts, its error bodies.
"""

from __future__ import annotations

import ast
import copy
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "letta"
# patch_partial_llm_config.json: the server looks a known model's context window up; these it cannot
LLM_REQUIRED = ("model", "model_endpoint_type")
EMBEDDING_REQUIRED = ("embedding_endpoint_type", "embedding_model", "embedding_dim")
PAGE = {"agents": 50, "tools": 50, "blocks": 100}  # the server's default `limit` per list endpoint
IMPORTED_NAME_SUFFIX = "_copy"  # get_imported_agent.json: the server names an imported agent a copy
UNKNOWN_TOOL = "tool-00000000-0000-4000-8000-000000000000"  # the id patch_unknown_tool_id.json names
ID_PATTERN = re.compile(r"^agent-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@cache
def exchange(name: str) -> dict[str, Any]:
    path = FIXTURES / f"{name}.json"
    if not path.exists():
        raise RuntimeError(
            f"the Letta simulator is built from recorded answers and {path} is missing: run it from a "
            "clone of the repository, or re-record them with python -m conformance.record_letta"
        )
    return json.loads(path.read_text())


def request(name: str) -> Any:
    return copy.deepcopy(exchange(name)["request"]["body"])


def answer(name: str) -> Any:
    return copy.deepcopy(exchange(name)["response"]["body"])


def filled_defaults(name: str, field: str) -> dict[str, Any]:
    """The keys of a config object the server filled by itself in a recorded exchange, in its order."""
    sent, got = request(name)[field], answer(name)[field]
    return {k: (None if k in sent else v) for k, v in got.items()}


def create_defaults(agent_type: str) -> tuple[dict, dict]:
    """llm_config and embedding_config defaults on create: letta_v1_agent forces enable_reasoner and
    put_inner_thoughts_in_kwargs off; the other types keep the server's reasoning default (memgpt_v2)."""
    name = "create_agent" if agent_type == "letta_v1_agent" else "create_agent_memgpt_v2_base_tools"
    return filled_defaults(name, "llm_config"), filled_defaults(name, "embedding_config")


def patch_llm_defaults() -> dict[str, Any]:
    """A PATCH replaces llm_config whole; what it does not say takes these (enable_reasoner flips on)."""
    return filled_defaults("patch_llm_config_required_keys", "llm_config")


@cache
def tool_catalogue() -> dict[str, dict]:
    return {t["name"]: t for t in answer("list_tools")}


@cache
def base_tools() -> dict[str, frozenset[str]]:
    """The tools the server adds per agent_type when include_base_tools is true (recorded types only)."""
    found = {}
    for name in ("create_agent_server_defaults", "create_agent_memgpt_v2_base_tools"):
        sent, got = request(name), answer(name)
        found[got["agent_type"]] = frozenset(t["name"] for t in got["tools"]) - set(sent["tools"])
    return found


@cache
def base_rule_types() -> dict[str, str]:
    """The rule type the server adds for a tool when it adds base tool rules (exit_loop, continue_loop)."""
    types: dict[str, str] = {}
    for name in ("create_agent_server_defaults", "create_agent_memgpt_v2_base_tools"):
        sent = {(r["tool_name"], r["type"]) for r in request(name)["tool_rules"]}
        types |= {
            r["tool_name"]: r["type"] for r in answer(name)["tool_rules"] if (r["tool_name"], r["type"]) not in sent
        }
    return types


@cache
def rule_types() -> frozenset[str]:
    """The tool rule types the server accepts, as its 422 for an unknown type lists them."""
    return frozenset(re.findall(r": '(\w+)'>", answer("create_unknown_tool_rule_type")["detail"]))


def block_default_limit() -> int:
    """The limit the server gives a block created without one (recorded: 100,000 characters)."""
    sent, got = request("create_agent")["memory_blocks"], answer("create_agent")["memory"]["blocks"]
    return next(g["limit"] for s, g in zip(sent, got, strict=False) if "limit" not in s)


def agent_skeleton() -> dict[str, Any]:
    return answer("create_agent")


def block_skeleton(label: str) -> dict[str, Any]:
    """A recorded block; the server gives the default labels (persona, human) their description."""
    blocks = {b["label"]: b for b in answer("list_blocks")}
    block = copy.deepcopy(blocks.get(label) or next(iter(blocks.values())))
    return block | {"label": label, "description": block["description"] if label in blocks else None}


def export_skeleton() -> dict[str, Any]:
    return answer("export_agent")


def validation_error(errors: list[dict], name: str = "create_null_block_limit") -> dict[str, Any]:
    """A 422 as the server writes it: `detail` is the repr of pydantic's error list, plus a trace_id."""
    body = answer(name)
    return body | {"detail": str(errors)}


def error_like(name: str, loc: tuple, value: Any, recorded_input: str | None = None) -> dict[str, Any]:
    """The first pydantic error of a recorded 422 at another place and for another input; where the
    message or context quotes the recorded input, it quotes this one."""
    error = ast.literal_eval(answer(name)["detail"])[0] | {"loc": loc, "input": value}
    if recorded_input is not None:
        text = repr(error).replace(repr(recorded_input), repr(value))
        error = ast.literal_eval(text) | {"loc": loc, "input": value}
    return error


def detail(name: str, recorded: str, actual: str) -> dict[str, Any]:
    """A recorded error body with the recorded subject (an id, a name) replaced by this request's."""
    body = answer(name)
    return body | {"detail": body["detail"].replace(recorded, actual)}
