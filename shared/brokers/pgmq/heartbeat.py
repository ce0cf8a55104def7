"""Keeps every outstanding message of this process invisible while the process is alive.

A dead process stops beating, so its messages reappear within one visibility timeout.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import psycopg
import structlog

from fleet.shared.db import connect_kwargs
from fleet.shared.reconnect import Reconnects

if TYPE_CHECKING:
    from fleet.shared.brokers.pgmq.parts import Queues

log = structlog.get_logger(__name__)


class Heartbeat(threading.Thread):
    def __init__(self, broker: Queues) -> None:
        super().__init__(name="pgmq-heartbeat", daemon=True)
        self.broker = broker
        self.vt = broker.settings.visibility_timeout_s
        self.interval = max(0.5, self.vt / 3)
        self.running = True
        self.stopped = threading.Event()
        self.reconnects = Reconnects("heartbeat")

    def stop(self) -> None:
        self.running = False
        self.stopped.set()

    def run(self) -> None:
        conn, wait = None, self.interval
        while self.running:
            self.stopped.wait(wait)
            if not self.running:
                break
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.broker.dsn, **connect_kwargs(self.broker.settings))
                self._beat(conn)
                self.reconnects.restored()
                wait = self.interval
            except psycopg.Error as e:  # a missed beat is made up at once, then with backoff: the vt runs on
                wait = self.reconnects.lost(e)
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
