"""The scheduler: enqueues the periodic jobs declared in periodic_jobs().

It holds a session-level Postgres advisory lock while it leads, so a second scheduler
stays idle until the first one dies (its connection closes and the lock is released).
Needs a direct connection (port 5432): a transaction pooler cannot hold session locks.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import structlog

from fleet.shared.db import database_dsn, one
from fleet.shared.errors import describe
from fleet.shared.leadership import LEADER_LOCK_KEY

log = structlog.get_logger(__name__)

APPLICATION_NAME = "fleet-scheduler"


@dataclass(frozen=True)
class Periodic:
    name: str
    job: str
    every_s: float
    payload: Callable[[], Any] = field(default=lambda: {})


def periodic_jobs() -> list[Periodic]:
    from fleet.shared.config import get_settings

    settings = get_settings()
    return [
        Periodic("housekeeping", "housekeeping", 3600.0),
        Periodic("provider_health", "refresh_provider_health", settings.health_refresh_interval_s),
        Periodic("memory_lifecycle", "memory_lifecycle", settings.lifecycle_interval_s),
        Periodic("requeue_stale_upgrades", "requeue_stale_upgrades", max(5.0, settings.upgrade_stale_after_s / 2)),
    ]


class Scheduler:
    def __init__(self, periodic: list[Periodic] | None = None, *, tick_s: float = 1.0, client=None) -> None:
        self.periodic = periodic_jobs() if periodic is None else periodic
        self.tick_s = tick_s
        self._client = client
        self.stop_event = threading.Event()
        self.is_leader = False

    @property
    def client(self):
        if self._client is None:
            from fleet.shared.client import FleetClient

            self._client = FleetClient()
        return self._client

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        name = f"{APPLICATION_NAME}:{socket.gethostname()}:{os.getpid()}"
        while not self.stop_event.is_set():
            try:
                with psycopg.connect(database_dsn(), autocommit=True, application_name=name[:63]) as conn:
                    self._contend(conn)
            except psycopg.OperationalError as e:
                self.is_leader = False
                log.warning("scheduler.connection_lost", error=str(e))
                self.stop_event.wait(1.0)

    def _contend(self, conn: psycopg.Connection) -> None:
        while not self.stop_event.is_set():
            got = one(conn.execute("select pg_try_advisory_lock(%s)", (LEADER_LOCK_KEY,)).fetchone())[0]
            if got:
                break
            self.stop_event.wait(self.tick_s)
        else:
            return
        self.is_leader = True
        log.info("scheduler.leading")
        try:
            while not self.stop_event.is_set():
                self.tick(conn)
                self.stop_event.wait(self.tick_s)
        finally:
            self.is_leader = False

    def tick(self, conn: psycopg.Connection) -> list[str]:
        """Enqueue every periodic job that is due; returns their names."""
        enqueued = []
        for p in self.periodic:
            try:
                # The due-mark commits only with the enqueue: a broker outage leaves the job due for the next tick.
                with conn.transaction():
                    due = conn.execute(
                        "insert into scheduler_runs (name, last_enqueued_at) values (%s, now())"
                        " on conflict (name) do update set last_enqueued_at = now()"
                        " where scheduler_runs.last_enqueued_at <= now() - %s * interval '1 second'"
                        " returning name",
                        (p.name, p.every_s),
                    ).fetchone()
                    if due:
                        self.client.enqueue(p.job, p.payload())
            except psycopg.OperationalError:
                raise  # our own connection is gone: run() reconnects and contends again
            except Exception as e:  # noqa: BLE001  logged; one periodic job's failure does not stop the others
                log.warning("scheduler.enqueue_failed", periodic=p.name, job=p.job, error=describe(e))
                continue
            if due:
                enqueued.append(p.name)
                log.info("scheduler.enqueued", periodic=p.name, job=p.job)
        return enqueued
