"""The job families, one place each: a package (chat, embed, agents, lifecycle) holds a family's actors
(actors.py) beside its logic; a family with one actor and no logic of its own is a module (echo, health,
housekeeping). A family imports the platform (fleet.shared), never another family.

Importing a family's logic declares nothing and needs no broker. `start()` is what a worker process runs
(`dramatiq fleet.workers:start`, which `fleet worker` starts): it sets up the broker (FLEET_BROKER) and
declares every family's actors on it.
"""

from __future__ import annotations

import importlib
import threading

import dramatiq

# The modules that declare actors, in the order they are declared.
ACTOR_MODULES = (
    "fleet.workers.agents.actors",
    "fleet.workers.agents.upgrade_actors",
    "fleet.workers.chat.actors",
    "fleet.workers.echo",
    "fleet.workers.embed.actors",
    "fleet.workers.health",
    "fleet.workers.housekeeping",
    "fleet.workers.lifecycle.actors",
)

_broker: dramatiq.Broker | None = None
_lock = threading.RLock()


def start() -> dramatiq.Broker:
    """The fleet's broker, with every actor declared on it (once per process)."""
    global _broker
    with _lock:
        if _broker is None:
            from fleet.shared.brokers import build_broker
            from fleet.shared.config import get_settings
            from fleet.shared.logs import configure_logging

            configure_logging(get_settings().log_level)
            broker = build_broker()
            dramatiq.set_broker(broker)
            _broker = broker
            for module in ACTOR_MODULES:
                importlib.import_module(module)
        return _broker


def actors_of(package: str, actors: dict[str, str]):
    """The `__getattr__` of a family package: its actors by name (actor -> the module declaring it),
    declared on first use (`start()`)."""

    def __getattr__(name: str):
        if name not in actors:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        start()
        return getattr(importlib.import_module(f"{package}.{actors[name]}"), name)

    return __getattr__
