"""Refuses to start a worker that would consume a queue whose required settings are missing, and sizes
the process's connection pool from its worker threads."""

from __future__ import annotations

from dramatiq.middleware import Middleware, MiddlewareError

from fleet.shared.config import Settings

# queue -> (setting attribute, variable name, why)
REQUIRED = {
    "agents": ("zuplo_base_url", "ZUPLO_BASE_URL", "every agent's endpoints must go through the billing proxy"),
    "upgrade_agents": ("zuplo_base_url", "ZUPLO_BASE_URL", "every agent's endpoints must go through the billing proxy"),
}


class MissingSetting(MiddlewareError):
    pass


def missing_settings(settings: Settings, queues: set[str] | None) -> list[str]:
    return [
        f"{var} is not set ({why}), and this worker consumes queue {queue!r}"
        for queue, (attr, var, why) in REQUIRED.items()
        if (queues is None or queue in queues) and not getattr(settings, attr)
    ]


class RequiredSettings(Middleware):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def before_worker_boot(self, broker, worker):
        from fleet.shared.db import size_pool_for_threads

        size_pool_for_threads(worker.worker_threads)
        problems = missing_settings(self.settings, worker.consumer_whitelist or None)
        if problems:
            raise MissingSetting("; ".join(problems))
