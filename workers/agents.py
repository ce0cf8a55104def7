"""`create_agent` on queue `agents`: a Letta agent from a template version for a user, with the billing
proxy forced on both endpoints; idempotent per user and template."""

from __future__ import annotations

from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from dramatiq.middleware import CurrentMessage

from shared import events
from shared.agentfile import parse_agent_file
from shared.agents import billing_endpoint, create_body
from shared.config import get_settings
from shared.db import get_pool
from shared.errors import PermanentError
from shared.middleware.events import job_fields
from shared.providers.letta import LettaClient
from shared.templates import get, list_templates

from .actor import job


class CreateAgentJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: UUID
    template: str = Field(min_length=1, max_length=100)
    version: str | None = Field(None, max_length=100)  # the highest published when absent


@job(CreateAgentJob)
def create_agent(job: CreateAgentJob) -> None:
    settings = get_settings()
    endpoint = billing_endpoint(settings, str(job.user_id))
    version = job.version or next(iter(reversed(list_templates(job.template))), {}).get("version")
    if version is None:
        raise PermanentError(f"template {job.template!r} has no published version")
    template = parse_agent_file(get(job.template, version))
    with get_pool().connection() as conn, conn.transaction():
        # one creator per user at a time; a retried job finds the agent it already made
        conn.execute("select pg_advisory_xact_lock(hashtext(%s))", (f"create_agent:{job.user_id}",))
        row = conn.execute("select letta_agent_id, template_name from user_profiles where user_id = %s",
                           (job.user_id,)).fetchone()
        if row and row[0]:
            if row[1] != job.template:
                raise PermanentError(f"user {job.user_id} already has an agent from template {row[1]!r}")
            return
        letta = LettaClient(settings)
        name = f"{job.template}-{job.user_id}"
        # a crash between Letta's answer and this commit leaves an agent no profile points to: find it by name
        found = letta.find_agents(name)
        agent = found[0] if found else letta.create_agent(
            create_body(template, name, str(job.user_id), endpoint, f"{job.template}@{version}"))
        conn.execute(
            "insert into user_profiles (user_id, letta_agent_id, template_name, template_version, updated_at)"
            " values (%s, %s, %s, %s, now()) on conflict (user_id) do update set letta_agent_id = excluded.letta_agent_id,"
            " template_name = excluded.template_name, template_version = excluded.template_version, updated_at = now()",
            (job.user_id, agent["id"], job.template, version))
    message = CurrentMessage.get_current_message()
    events.emit("agent.created", **(job_fields(message) if message else {}), agent_id=agent["id"],
                template=f"{job.template}@{version}")
