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
        JobType("chat_completion", "chat", "Streams a chat answer to listeners and stores the messages."),
        JobType("refresh_provider_health", "health", "Probes the configured providers into provider_health."),
        JobType("memory_lifecycle", "lifecycle", "Expires, archives, decays, evicts, merges and re-embeds memories."),
        JobType("embed_memories", "embed_memories", "Embeds memories' payloads into memories.embedding."),
        JobType("create_agent", "agents", "Creates a Letta agent from a template for a user (billing proxy forced)."),
        JobType("upgrade_fanout", "upgrade_jobs", "Selects a run's cohort and enqueues one upgrade per agent."),
        JobType("upgrade_agent", "upgrade_agents", "Upgrades one agent to a template version (diff, one PATCH, verify)."),
        JobType("requeue_stale_upgrades", "maintenance", "Requeues upgrades whose heartbeat went stale."),
        JobType("embed_documents", "embed", "Embeds documents (inline or rows of a registered source) into pgvector."),
    ]
}


class UnknownJobType(LookupError):
    pass


def job_type(name: str) -> JobType:
    """By actor name, or by queue name when one job type owns that queue (`fleet enqueue embed ...`)."""
    if name in JOB_TYPES:
        return JOB_TYPES[name]
    by_queue = [j for j in JOB_TYPES.values() if j.queue == name]
    if len(by_queue) == 1:
        return by_queue[0]
    raise UnknownJobType(f"unknown job type {name!r}; registered: {', '.join(sorted(JOB_TYPES))}")


def queues() -> list[str]:
    return sorted({j.queue for j in JOB_TYPES.values()})
