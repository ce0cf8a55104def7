"""Fleet: a queue-driven worker fleet for AI-agent backends.

The producer API is this package's top level:

    from fleet import FleetClient
    client = FleetClient()
    client.enqueue("echo", {"message": "hi"}, idempotency_key="order-42")

Everything else lives in sub-packages: `fleet.shared` (the platform), `fleet.workers` (one package per job
family), `fleet.ops` (operator tools), `fleet.simulator` and `fleet.gateway`. The names below are loaded on
first use, so `import fleet.shared.config` (and every worker process) does not pay for the SDK's imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "FleetClient": "fleet.shared.client",
    "Enqueued": "fleet.shared.client",
    "ChatStream": "fleet.shared.client",
    "ChatJob": "fleet.shared.jobs",
    "ChatMessage": "fleet.shared.jobs",
    "EmbedJob": "fleet.shared.jobs",
    "InlineDocument": "fleet.shared.jobs",
    "FleetError": "fleet.shared.errors",
    "InvalidPayload": "fleet.shared.errors",
    "PayloadTooLarge": "fleet.shared.errors",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from fleet.shared.client import ChatStream, Enqueued, FleetClient
    from fleet.shared.errors import FleetError, InvalidPayload, PayloadTooLarge
    from fleet.shared.jobs import ChatJob, ChatMessage, EmbedJob, InlineDocument


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fleet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
