"""The fleet's actors. Importing this module sets up the broker (FLEET_BROKER) and declares every actor,
which is what `dramatiq fleet.workers` (and `fleet worker`) needs."""

from __future__ import annotations

import dramatiq

from fleet.shared.brokers import build_broker
from fleet.shared.config import get_settings
from fleet.shared.logs import configure_logging

configure_logging(get_settings().log_level)
broker = build_broker()
dramatiq.set_broker(broker)

# The actors bind to the broker set above.
from fleet.workers import agents, chat, echo, embed, health, housekeeping, lifecycle, upgrades  # noqa: E402

__all__ = ["broker", "agents", "chat", "echo", "embed", "health", "housekeeping", "lifecycle", "upgrades"]
