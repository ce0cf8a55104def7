"""One LISTEN connection per process: the queue table's insert trigger wakes that queue's consumers."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import psycopg
import structlog
from psycopg import sql

from fleet.shared.reconnect import Reconnects

if TYPE_CHECKING:
    from fleet.shared.brokers.pgmq.parts import Queues

log = structlog.get_logger(__name__)


class Notifier(threading.Thread):
    def __init__(self, broker: Queues) -> None:
        super().__init__(name="pgmq-notifier", daemon=True)
        self.broker = broker
        self.channels: dict[str, str] = {}  # channel -> queue
        self.pending: dict[str, threading.Event] = {}
        self.lock = threading.Lock()
        self.running = True
        self.reconnects = Reconnects("notifier")

    def listen(self, queue_name: str) -> None:
        channel = f"pgmq.q_{queue_name}.INSERT"
        with self.lock:
            if channel in self.channels:
                return
            done = self.pending.setdefault(channel, threading.Event())
        done.wait(5)  # LISTEN before the first read, so no insert slips between

    def stop(self) -> None:
        self.running = False

    def run(self) -> None:
        while self.running:
            try:
                with psycopg.connect(self.broker.dsn, autocommit=True, application_name="fleet-notifier") as conn:
                    self._relisten_all()
                    self.reconnects.restored()
                    while self.running:
                        self._subscribe(conn)
                        for note in conn.notifies(timeout=0.25):
                            queue = self.channels.get(note.channel)
                            if queue is not None:
                                self.broker.state(queue).wake.set()
            except psycopg.Error as e:
                if self.running:
                    time.sleep(self.reconnects.lost(e))

    def _relisten_all(self) -> None:
        """A new connection listens to nothing yet: every channel is subscribed again, and every consumer woken
        (notifications may have been missed while disconnected)."""
        with self.lock:
            self.pending.update({c: threading.Event() for c in self.channels})
            self.channels.clear()
        for _, state in self.broker.queue_states():
            state.wake.set()

    def _subscribe(self, conn: psycopg.Connection) -> None:
        with self.lock:
            pending, self.pending = self.pending, {}
        for channel, done in pending.items():
            conn.execute(sql.SQL("listen {}").format(sql.Identifier(channel)))
            with self.lock:
                self.channels[channel] = channel[len("pgmq.q_") : -len(".INSERT")]
            done.set()
