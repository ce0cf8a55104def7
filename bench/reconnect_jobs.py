"""The reconnect soak's job type (loaded by its workers with FLEET_JOBS=bench.reconnect_jobs): it records when
it started, so the soak reads each job's pickup latency (enqueue to start) from bus_events."""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict

from fleet import job
from fleet.shared import events

QUEUE = "reconnect_probe"


class ProbeJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seq: int  # the producer's sequence number: each is sent once
    t: float  # when the producer sent it (epoch seconds, this machine's clock)


@job(ProbeJob, queue=QUEUE, name="reconnect_probe", max_retries=3)
def reconnect_probe(payload: ProbeJob) -> None:
    """Records its start (probe.started with the producer's send time) for the reconnect soak."""
    events.emit("probe.started", queue=QUEUE, seq=payload.seq, t=payload.t, started=time.time())
