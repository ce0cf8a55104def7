"""`create_agent` on queue `agents`: a Letta agent from a template version for a user, with the billing
proxy forced on both endpoints; idempotent per user and template."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from dramatiq.middleware import CurrentMessage
from pydantic import BaseModel, ConfigDict, Field

from fleet import job
from fleet.shared import claims, events
from fleet.shared.config import get_settings
from fleet.shared.db import get_pool
from fleet.shared.errors import DeferredError, PermanentError
from fleet.shared.guards import claim, release
from fleet.shared.middleware.events import job_fields
from fleet.shared.providers.letta import LettaClient
from fleet.workers.agents.agentfile import parse_agent_file
from fleet.workers.agents.creation import billing_endpoint, create_body
from fleet.workers.agents.templates import get, list_templates


class CreateAgentJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: UUID
    template: str = Field(min_length=1, max_length=100)
    version: str | None = Field(None, max_length=100)  # the highest published when absent


CLAIM_S = 120  # a creator that died gives way to another job for the same user after this long


def claim_creation(user_id: str, job_id: str) -> None:
    """Claim the creation of this user's agent for this job (its retries and redeliveries keep the job id, so
    they take their own claim back at once); another job for the same user is deferred until the claim is
    released or expires."""
    if not claim(claims.CREATE_AGENT, user_id, job_id, CLAIM_S):
        raise DeferredError(f"another job is creating the agent of user {user_id}", retry_after_s=5)


def release_creation(user_id: str, job_id: str) -> None:
    release(claims.CREATE_AGENT, user_id, job_id)


@job(CreateAgentJob, queue="agents")
def create_agent(job: CreateAgentJob) -> None:
    """Creates a Letta agent from a template for a user (billing proxy forced)."""
    settings = get_settings()
    endpoint = billing_endpoint(settings, str(job.user_id))
    latest: dict[str, Any] = next(iter(reversed(list_templates(job.template))), {})
    version = job.version or latest.get("version")
    if version is None:
        raise PermanentError(f"template {job.template!r} has no published version")
    template = parse_agent_file(get(job.template, version))
    message = CurrentMessage.get_current_message()
    job_id = message.message_id if message else f"direct-{job.user_id}"
    claim_creation(str(job.user_id), job_id)  # one creator per user, without holding a connection over HTTP
    with get_pool().connection() as conn:
        row = conn.execute(
            "select letta_agent_id, template_name, template_version from user_profiles where user_id = %s",
            (job.user_id,),
        ).fetchone()
    if row and row[0]:
        release_creation(str(job.user_id), job_id)
        if row[1] != job.template:
            raise PermanentError(f"user {job.user_id} already has an agent from template {row[1]!r}")
        events.emit(
            "agent.exists", **(job_fields(message) if message else {}), agent_id=row[0], template=f"{row[1]}@{row[2]}"
        )
        return
    letta = LettaClient(settings)
    name = f"{job.template}-{job.user_id}"
    # a crash between Letta's answer and the profile's commit leaves an agent no profile points to: find it by name
    found = letta.find_agents(name)
    agent = (
        found[0]
        if found
        else letta.create_agent(create_body(template, name, str(job.user_id), endpoint, f"{job.template}@{version}"))
    )
    with get_pool().connection() as conn:
        conn.execute(
            "insert into user_profiles (user_id, letta_agent_id, template_name, template_version, updated_at)"
            " values (%s, %s, %s, %s, now()) on conflict (user_id) do update set letta_agent_id = "
            "excluded.letta_agent_id,"
            " template_name = excluded.template_name, template_version = excluded.template_version, updated_at = now()",
            (job.user_id, agent["id"], job.template, version),
        )
    release_creation(str(job.user_id), job_id)
    events.emit(
        "agent.created",
        **(job_fields(message) if message else {}),
        agent_id=agent["id"],
        template=f"{job.template}@{version}",
    )
