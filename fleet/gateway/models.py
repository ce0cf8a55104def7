"""Request bodies: the job models the workers validate with, unknown fields refused."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleet.gateway.errors import InvalidBody
from fleet.shared.jobs import ChatJob, EmbedJob

SESSION_SCOPE_CHARS = 39  # "u:{uuid}:" before a verified user's session id (see tenancy.scoped_session_id)


class ChatBody(ChatJob):
    model_config = ConfigDict(extra="forbid", title="ChatRequest")
    session_id: str = Field(
        min_length=1,
        max_length=200 - SESSION_SCOPE_CHARS,
        description="the caller's own session id (each user has a namespace of their own)",
    )
    user_id: None = Field(None, description="not accepted in the body: the user is the token's sub")


class EmbedBody(EmbedJob):
    model_config = ConfigDict(extra="forbid", title="EmbedRequest")
    idempotency_key: str | None = Field(None, min_length=1, max_length=200)


TEMPLATE_NAME = r"^[a-z0-9][a-z0-9_.-]{0,99}$"  # as agent_templates' check says


class AgentBody(BaseModel):
    model_config = ConfigDict(extra="forbid", title="AgentRequest")
    template: str = Field(pattern=TEMPLATE_NAME, description="the published template the agent is made from")
    version: str | None = Field(
        None, min_length=1, max_length=100, description="a published version of it; the highest published when absent"
    )
    user_id: UUID | None = Field(
        None,
        description=(
            "whose agent, only when tokens are not verified (development mode, or a backend that signs its"
            " requests); with a verified token the user is the token's sub"
        ),
    )
    idempotency_key: str | None = Field(None, min_length=1, max_length=200)


class TemplateBody(BaseModel):
    model_config = ConfigDict(extra="forbid", title="TemplateRequest")
    name: str = Field(pattern=TEMPLATE_NAME)
    version: str = Field(min_length=1, max_length=100, description="SemVer 2.0, above every published version")
    content: dict[str, Any] = Field(description="the Agent File (.af): exactly one agent, its blocks and tools")


class Cohort(BaseModel):
    model_config = ConfigDict(extra="forbid", title="UpgradeCohort")
    from_version: str | None = Field(
        None, min_length=1, max_length=100, description="only the agents on this version of the template"
    )
    user_ids: list[UUID] | None = Field(None, max_length=10_000, description="only these users' agents")


class UpgradeBody(BaseModel):
    model_config = ConfigDict(extra="forbid", title="UpgradeRequest")
    template: str = Field(pattern=TEMPLATE_NAME)
    version: str = Field(min_length=1, max_length=100, description="the published version to upgrade to")
    dry_run: bool = Field(True, description="record each agent's diff and change nothing (the default)")
    cohort: Cohort = Field(default_factory=Cohort)
    canary_percent: float | None = Field(
        None,
        gt=0,
        le=100,
        description=("a stable slice of the cohort's users, the same on every run: 5 upgrades the same 5% each time"),
    )
    halt_failure_rate: float | None = Field(
        None,
        gt=0,
        le=1,
        description=("the run halts itself above this share of failed agents; UPGRADE_HALT_FAILURE_RATE when absent"),
    )
    halt_min_sample: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description=("finished agents before the halt rule applies; UPGRADE_HALT_MIN_SAMPLE when absent"),
    )
    idempotency_key: str | None = Field(None, min_length=1, max_length=200)


def _nul_at(value, where: tuple = ()) -> tuple | None:
    """Where a NUL character is, in any string or key of a parsed body (PostgreSQL text cannot hold one)."""
    if isinstance(value, str):
        return where if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            if "\x00" in str(key):
                return (*where, key)
            if (found := _nul_at(item, (*where, key))) is not None:
                return found
    if isinstance(value, list):
        for i, item in enumerate(value):
            if (found := _nul_at(item, (*where, i))) is not None:
                return found
    return None


def parse(model, raw: bytes):
    if not raw.strip():
        raise InvalidBody(
            [{"type": "json_invalid", "loc": ("body",), "msg": "empty body", "ctx": {"error": "the body is empty"}}]
        )
    try:
        body = model.model_validate_json(raw)
    except ValidationError as e:
        raise InvalidBody(e.errors(include_url=False)) from None
    if (where := _nul_at(body.model_dump())) is not None:
        raise InvalidBody(
            [
                {
                    "type": "string_nul",
                    "loc": ("body", *where),
                    "msg": "a NUL character (\\u0000) is not accepted in a string",
                }
            ]
        )
    return body
