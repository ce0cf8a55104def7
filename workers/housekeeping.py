"""`housekeeping`: prunes expired idempotency records in bounded batches (run hourly by the scheduler)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from shared import events
from shared.db import get_pool

from .actor import job


class HousekeepingJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(5000, ge=1, le=100_000)


@job(HousekeepingJob)
def housekeeping(job: HousekeepingJob) -> None:
    deleted = 0
    with get_pool().connection() as conn:
        while True:
            n = conn.execute(
                "delete from request_dedup where ctid = any(array("
                " select ctid from request_dedup where expires_at < now() limit %s))",
                (job.batch_size,),
            ).rowcount
            deleted += n
            if n < job.batch_size:
                break
    events.emit("housekeeping.done", request_dedup_deleted=deleted)
