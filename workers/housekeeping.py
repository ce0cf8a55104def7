"""`housekeeping`: prunes expired idempotency records, the gateway's seen signatures and its job owner
rows older than GATEWAY_JOBS_RETENTION_DAYS, in bounded batches (run hourly by the scheduler)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from fleet import job
from fleet.shared import events
from fleet.shared.config import get_settings
from fleet.shared.db import get_pool

# table -> the rows to delete (%s: the age limit in seconds, where there is one); fixed SQL, no input in it
PRUNED = {
    "request_dedup": ("expires_at < now()", False),
    "gateway_signatures": ("expires_at < now()", False),
    "gateway_jobs": ("created_at < now() - %s * interval '1 second'", True),
}


class HousekeepingJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(5000, ge=1, le=100_000)


def delete_in_batches(conn, table: str, batch_size: int, max_age_s: float) -> int:
    where, aged = PRUNED[table]
    params = ((max_age_s,) if aged else ()) + (batch_size,)
    deleted = 0
    while True:
        n = conn.execute(
            f"delete from {table} where ctid = any(array(select ctid from {table} where {where} limit %s))", params
        ).rowcount
        deleted += n
        if n < batch_size:
            return deleted


@job(HousekeepingJob, queue="maintenance")
def housekeeping(job: HousekeepingJob) -> None:
    """Prunes expired idempotency records (scheduled hourly)."""
    max_age_s = get_settings().gateway_jobs_retention_days * 86400
    with get_pool().connection() as conn:
        deleted = {table: delete_in_batches(conn, table, job.batch_size, max_age_s) for table in PRUNED}
    events.emit("housekeeping.done", **{f"{table}_deleted": n for table, n in deleted.items()})
