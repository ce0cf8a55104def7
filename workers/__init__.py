"""The job families, one place each: a package (chat, embed, agents, lifecycle) holds a family's actors
(actors.py) beside its logic; a family with one actor and no logic of its own is a module (echo, health,
housekeeping). A family imports the platform (fleet.shared), never another family. Families declare their
jobs with the public decorator (`from fleet import job`), exactly as a user's own modules do.

Importing a family declares its job types and needs no broker. `start()` is what a worker process runs
(`dramatiq fleet.workers:start`, which `fleet worker` starts): it sets up the broker (FLEET_BROKER), loads
the families and the modules FLEET_JOBS names, declares every job on the broker as an actor, and publishes
what it serves to the job_types table.
"""

from __future__ import annotations

import importlib
import threading

import dramatiq
import structlog

from fleet.shared.registry import FAMILY_MODULES

ACTOR_MODULES = FAMILY_MODULES  # the modules that declare the fleet's own job types

log = structlog.get_logger(__name__)

_broker: dramatiq.Broker | None = None
_lock = threading.RLock()


def start() -> dramatiq.Broker:
    """The fleet's broker, with every job type declared on it as an actor (once per process)."""
    global _broker
    with _lock:
        if _broker is None:
            from fleet.shared.brokers import build_broker
            from fleet.shared.config import get_settings
            from fleet.shared.logs import configure_logging
            from fleet.shared.registry import declare_actors, load, publish

            configure_logging(get_settings().log_level)
            broker = build_broker()
            dramatiq.set_broker(broker)
            load()
            served = declare_actors(broker)
            _broker = broker
            try:
                publish(served)
            except Exception as e:  # noqa: BLE001  logged; the jobs run without it; job_types is a catalogue, refreshed at each start
                from fleet.shared.errors import describe
                from fleet.shared.redact import redact

                log.warning("job_types.publish_failed", error=redact(describe(e)))
        return _broker


def actors_of(package: str, actors: dict[str, str]):
    """The `__getattr__` of a family package: its jobs by name (job -> the module declaring it)."""

    def __getattr__(name: str):
        if name not in actors:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{actors[name]}"), name)

    return __getattr__
