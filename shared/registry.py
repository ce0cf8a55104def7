"""The job types the fleet knows: name -> queue. Producers and workers both read it, so a
payload can never name a queue or an actor that is not registered here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class JobType:
    name: str  # the actor's name
    queue: str
    description: str


JOB_TYPES: dict[str, JobType] = {
    j.name: j
    for j in [
        JobType("echo", "echo", "No-op/echo job: the spine's own workload (sleep, fail on demand)."),
        JobType("housekeeping", "maintenance", "Prunes expired idempotency records (scheduled hourly)."),
    ]
}


class UnknownJobType(LookupError):
    pass


def job_type(name: str) -> JobType:
    try:
        return JOB_TYPES[name]
    except KeyError:
        raise UnknownJobType(f"unknown job type {name!r}; registered: {', '.join(sorted(JOB_TYPES))}") from None


def queues() -> list[str]:
    return sorted({j.queue for j in JOB_TYPES.values()})
