"""`echo`: the no-op job. It proves the pipes: delivery, retries, dead letters, redelivery."""

from __future__ import annotations

import time
from typing import Literal

from dramatiq.middleware import CurrentMessage
from pydantic import BaseModel, ConfigDict, Field

from fleet import job
from fleet.shared import events
from fleet.shared.errors import PermanentError, TransientError


class EchoJob(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str = Field("", max_length=10_000)
    sleep_ms: int = Field(0, ge=0, le=600_000)
    fail: Literal["transient", "permanent"] | None = None
    fail_attempts: int = Field(1_000_000, ge=0, description="fail only on the first N attempts")
    retry_after_s: float | None = Field(None, ge=0, le=3600)
    record: bool = False  # write an echo.done event with the message


@job(EchoJob, queue="echo", min_backoff=200, max_backoff=5_000)
def echo(job: EchoJob) -> None:
    """No-op/echo job: the spine's own workload (sleep, fail on demand)."""
    message = CurrentMessage.get_current_message()
    attempt = message.options.get("retries", 0) + 1 if message else 1
    if job.sleep_ms:
        time.sleep(job.sleep_ms / 1000)
    if job.fail and attempt <= job.fail_attempts:
        if job.fail == "permanent":
            raise PermanentError(f"echo asked to fail permanently: {job.message}")
        raise TransientError(f"echo asked to fail (attempt {attempt})", retry_after_s=job.retry_after_s)
    if job.record and message is not None:
        events.emit(
            "echo.done",
            trace_id=message.options.get("trace_id"),
            job_id=message.message_id,
            queue=message.queue_name,
            actor=message.actor_name,
            message=job.message,
            attempt=attempt,
        )
