"""Keeps every outstanding message of this process invisible while the process is alive.

A dead process stops beating, so its messages reappear within one visibility timeout.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import psycopg
import structlog

from fleet.shared.db import connect_kwargs

if TYPE_CHECKING:
    from fleet.shared.brokers.pgmq.broker import PgmqBroker

log = structlog.get_logger(__name__)


class Heartbeat(threading.Thread):
    def __init__(self, broker: PgmqBroker) -> None:
        super().__init__(name="pgmq-heartbeat", daemon=True)
        self.broker = broker
        self.vt = broker.settings.visibility_timeout_s
        self.interval = max(0.5, self.vt / 3)
        self.running = True
        self.stopped = threading.Event()

    def stop(self) -> None:
        self.running = False
        self.stopped.set()

    def run(self) -> None:
        conn = None
        while self.running:
            self.stopped.wait(self.interval)
            if not self.running:
                break
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.broker.dsn, **connect_kwargs(self.broker.settings))
                self._beat(conn)
            except psycopg.Error as e:
                log.warning("heartbeat.failed", error=str(e))
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def _beat(self, conn: psycopg.Connection) -> None:
        for queue_name, state in self.broker.queue_states():
            with state.lock:
                ids = list(state.outstanding)
            if ids:
                conn.execute("select count(*) from pgmq.set_vt(%s, %s::bigint[], %s)", (queue_name, ids, self.vt))
