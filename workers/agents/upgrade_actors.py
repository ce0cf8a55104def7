"""Cohort upgrades: `upgrade_fanout` (queue upgrade_jobs, also fed by SQL's ams_enqueue_upgrade),
`upgrade_agent` (queue upgrade_agents, one job per agent) and `requeue_stale_upgrades` (scheduled)."""

from __future__ import annotations

from uuid import UUID

import dramatiq
from dramatiq.middleware import CurrentMessage
from pydantic import BaseModel, ConfigDict, Field

from fleet import job
from fleet.shared.client import FleetClient
from fleet.shared.config import get_settings
from fleet.shared.middleware.events import job_fields
from fleet.shared.middleware.retries import is_last_attempt
from fleet.workers.agents.upgrades import fan_out, requeue_stale, upgrade_one


class FanoutJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run_id: UUID


class UpgradeAgentJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run_id: UUID
    agent_id: str = Field(min_length=1, max_length=200)


class RequeueJob(BaseModel):
    model_config = ConfigDict(extra="forbid")


_client: FleetClient | None = None


def client() -> FleetClient:
    global _client
    if _client is None:
        _client = FleetClient()
    return _client


@job(FanoutJob, queue="upgrade_jobs")
def upgrade_fanout(job: FanoutJob) -> None:
    """Selects a run's cohort and enqueues one upgrade per agent."""
    fan_out(str(job.run_id), client())


@job(UpgradeAgentJob, queue="upgrade_agents")
def upgrade_agent(job: UpgradeAgentJob) -> None:
    """Upgrades one agent to a template version (diff, one PATCH, verify)."""
    message = CurrentMessage.get_current_message()
    upgrade_one(
        str(job.run_id),
        job.agent_id,
        get_settings(),
        job_fields(message) if message else {},
        last_attempt=is_last_attempt(dramatiq.get_broker(), message) if message else True,
    )


@job(RequeueJob, queue="maintenance", max_retries=0)
def requeue_stale_upgrades(job: RequeueJob) -> None:
    """Requeues upgrades whose heartbeat went stale."""
    requeue_stale(get_settings(), client())
