"""Fleet: a queue-driven worker fleet for AI-agent backends.

Declare your own job types and enqueue them; this package's top level is the public API:

    from fleet import FleetClient, job

    @job(SummarizeJob, queue="summaries", max_retries=5, rate_limit=60)
    def summarize(payload: SummarizeJob) -> None: ...

    client = FleetClient()
    client.enqueue(summarize, SummarizeJob(document_id="doc-1"), idempotency_key="doc-1")
    client.enqueue("echo", {"message": "hi"})  # by name

A worker serves them with `fleet worker --jobs myapp.jobs` (or FLEET_JOBS=myapp.jobs). Everything else lives
in sub-packages: `fleet.shared` (the platform), `fleet.workers` (one package per job family), `fleet.ops`
(operator tools), `fleet.simulator` and `fleet.gateway`. The names below are loaded on first use, so
`import fleet.shared.config` (and every worker process) does not pay for the SDK's imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "job": "fleet.shared.registry",
    "Job": "fleet.shared.registry",
    "JobOptions": "fleet.shared.registry",
    "JobType": "fleet.shared.registry",
    "Lease": "fleet.shared.registry",
    "RateLimit": "fleet.shared.registry",
    "InvalidJobDeclaration": "fleet.shared.registry",
    "UnknownJobType": "fleet.shared.registry",
    "FleetClient": "fleet.shared.client",
    "Enqueued": "fleet.shared.client",
    "ChatStream": "fleet.shared.client",
    "ChatJob": "fleet.shared.jobs",
    "ChatMessage": "fleet.shared.jobs",
    "EmbedJob": "fleet.shared.jobs",
    "InlineDocument": "fleet.shared.jobs",
    "FleetError": "fleet.shared.errors",
    "PermanentError": "fleet.shared.errors",
    "TransientError": "fleet.shared.errors",
    "DeferredError": "fleet.shared.errors",
    "InvalidPayload": "fleet.shared.errors",
    "PayloadTooLarge": "fleet.shared.errors",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers (`X as X` re-exports X)
    from fleet.shared.client import (
        ChatStream as ChatStream,
        Enqueued as Enqueued,
        FleetClient as FleetClient,
    )
    from fleet.shared.errors import (
        DeferredError as DeferredError,
        FleetError as FleetError,
        InvalidPayload as InvalidPayload,
        PayloadTooLarge as PayloadTooLarge,
        PermanentError as PermanentError,
        TransientError as TransientError,
    )
    from fleet.shared.jobs import (
        ChatJob as ChatJob,
        ChatMessage as ChatMessage,
        EmbedJob as EmbedJob,
        InlineDocument as InlineDocument,
    )
    from fleet.shared.registry import (
        InvalidJobDeclaration as InvalidJobDeclaration,
        Job as Job,
        JobOptions as JobOptions,
        JobType as JobType,
        Lease as Lease,
        RateLimit as RateLimit,
        UnknownJobType as UnknownJobType,
        job as job,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fleet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
