"""The fleet's actors. Importing this module sets up the broker (FLEET_BROKER) and declares every actor,
which is what `dramatiq workers` (and `fleet worker`) needs."""

from __future__ import annotations

import dramatiq

from shared.brokers import build_broker
from shared.config import get_settings
from shared.logs import configure_logging

configure_logging(get_settings().log_level)
broker = build_broker()
dramatiq.set_broker(broker)

from . import agents, chat, echo, embed, health, housekeeping, lifecycle, upgrades  # noqa: E402  (actors bind to the broker set above)

__all__ = ["broker", "agents", "chat", "echo", "embed", "health", "housekeeping", "lifecycle", "upgrades"]
