"""`refresh_provider_health` on queue `health`: probe every configured provider (scheduled every
HEALTH_REFRESH_INTERVAL_S) and record the result in provider_health."""

from __future__ import annotations

from dramatiq.middleware import CurrentMessage
from pydantic import BaseModel, ConfigDict

from fleet import job
from fleet.shared.health import refresh
from fleet.shared.middleware.events import job_fields


class HealthJob(BaseModel):
    model_config = ConfigDict(extra="forbid")


@job(HealthJob, queue="health", max_retries=0)
def refresh_provider_health(job: HealthJob) -> None:
    """Probes the configured providers into provider_health."""
    message = CurrentMessage.get_current_message()
    refresh(trace=job_fields(message) if message else None)
