"""PgmqBroker: queues, producing (through the one bulk path in sender.py), and the per-process threads
(notifier, heartbeat) its consumers share."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import dramatiq
import psycopg
from dramatiq.broker import Broker, Consumer
from dramatiq.errors import ConnectionClosed, QueueNotFound
from psycopg import sql

from fleet.shared.brokers.hooks import ImplementedHooksOnly
from fleet.shared.brokers.pgmq.consumer import PgmqConsumer
from fleet.shared.brokers.pgmq.heartbeat import Heartbeat
from fleet.shared.brokers.pgmq.notifier import Notifier
from fleet.shared.brokers.pgmq.sender import SEND_BATCH_SIZE, Chunk, payload_envelopes, send_in_bulk
from fleet.shared.brokers.pgmq.state import QueueState
from fleet.shared.capabilities import PGMQ
from fleet.shared.config import Settings, get_settings
from fleet.shared.db import connect_kwargs, database_dsn, get_pool

QUEUE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,46}$")


def validate_queue_name(name: str) -> str:
    if not QUEUE_NAME.match(name):
        raise ValueError(
            f"invalid queue name {name!r}: lowercase letters, digits and _ (max 47), starting with a letter"
        )
    return name


# Signals reach only the middleware that implement them (ImplementedHooksOnly): enqueue_many's
# per-message cost stays low.
class PgmqBroker(ImplementedHooksOnly, Broker):
    capabilities = PGMQ  # the consumer inserts the jobs' bus_events in its ack transaction; vt redelivers

    def __init__(self, *, settings: Settings | None = None, middleware=None) -> None:
        super().__init__(middleware=middleware)
        self.settings = settings or get_settings()
        self.dsn = database_dsn(self.settings)
        self.queues: dict[str, bool] = {}
        self._created: set[str] = set()
        self._states: dict[str, QueueState] = {}
        self._states_lock = threading.Lock()
        self._notifier: Notifier | None = None
        self._heartbeat: Heartbeat | None = None

    # -- connections and per-queue state -----------------------------------
    @property
    def pool(self):
        return get_pool()

    def connect(self) -> psycopg.Connection:
        try:
            return psycopg.connect(self.dsn, **connect_kwargs(self.settings))
        except psycopg.OperationalError as e:
            raise ConnectionClosed(e) from None

    def state(self, queue_name: str) -> QueueState:
        with self._states_lock:
            return self._states.setdefault(queue_name, QueueState())

    def queue_states(self) -> list[tuple[str, QueueState]]:
        with self._states_lock:
            return list(self._states.items())

    # -- queues ------------------------------------------------------------
    def declare_queue(self, queue_name: str) -> None:
        if queue_name in self.queues:
            return
        validate_queue_name(queue_name)
        self.emit_before("declare_queue", queue_name)
        self.queues[queue_name] = True
        self.emit_after("declare_queue", queue_name)

    def ensure_queue(self, queue_name: str, conn: psycopg.Connection | None = None) -> None:
        """Create the pgmq queue (and its insert notification) once per process."""
        if queue_name in self._created:
            return
        validate_queue_name(queue_name)

        def create(c: psycopg.Connection) -> None:
            exists = c.execute(
                "select 1 from pg_trigger t join pg_class r on r.oid = t.tgrelid join pg_namespace n on n.oid = "
                "r.relnamespace"
                " where n.nspname = 'pgmq' and r.relname = %s and t.tgname = 'fleet_notify_insert'",
                (f"q_{queue_name}",),
            ).fetchone()
            if not exists:  # DDL only when needed: `fleet migrate` creates the registered queues
                c.execute("select fleet_ensure_queue(%s)", (queue_name,))

        if conn is not None:
            create(conn)
        else:
            with self.pool.connection() as c:
                create(c)
        self._created.add(queue_name)

    # -- producing ---------------------------------------------------------
    def enqueue(self, message: dramatiq.Message, *, delay: int | None = None) -> dramatiq.Message:
        self.enqueue_many([message], delay=delay)
        return message

    def enqueue_many(
        self, messages: Iterable[dramatiq.Message], *, delay: int | None = None, conn: psycopg.Connection | None = None
    ) -> list[int]:
        """Enqueue many messages atomically (one `pgmq.send_batch` per queue and chunk of 1,000), each seen
        by the middleware. With `conn`, inside the caller's transaction on that connection (the SDK claims
        idempotency keys in the same one). Returns the pgmq ids."""
        by_queue: dict[str, list[dramatiq.Message]] = {}
        for message in messages:
            if message.queue_name not in self.queues:
                raise QueueNotFound(message.queue_name)
            by_queue.setdefault(message.queue_name, []).append(message)
        count = sum(len(batch) for batch in by_queue.values())
        chunks = self._encoded(by_queue, delay)
        ids = send_in_bulk(self, by_queue, chunks if count > SEND_BATCH_SIZE else list(chunks), delay, conn)
        for batch in by_queue.values():
            for message in batch:
                self.emit_after("enqueue", message, delay)
        return ids

    def _encoded(self, by_queue: dict[str, list[dramatiq.Message]], delay: int | None) -> Iterator[Chunk]:
        for queue_name, batch in by_queue.items():
            for start in range(0, len(batch), SEND_BATCH_SIZE):
                chunk = batch[start : start + SEND_BATCH_SIZE]
                for message in chunk:
                    self.emit_before("enqueue", message, delay)
                yield queue_name, [m.encode().decode() for m in chunk]

    def can_enqueue_in_bulk(self) -> bool:
        """Whether producers may use enqueue_payloads: the messages are JSON (dramatiq's JSONEncoder), and
        every middleware with an enqueue hook declares that the payload path does its work
        (`enqueue_hooks_done_in_bulk`); any other must see each message."""
        hooked = self._implementing("before_enqueue") + self._implementing("after_enqueue")
        json_messages = type(dramatiq.get_encoder()) is dramatiq.JSONEncoder
        return json_messages and all(getattr(m, "enqueue_hooks_done_in_bulk", False) for m in hooked)

    def enqueue_payloads(
        self,
        queue_name: str,
        actor_name: str,
        payloads: list,
        *,
        trace_id: str | None = None,
        delay_ms: int | None = None,
    ) -> list[tuple[str, str]]:
        """For producers, atomic per call: the envelopes are written as JSON text (no Message objects, no
        per-message hooks), sent through the same bulk path as enqueue_many. Only when no middleware must
        see each message (see can_enqueue_in_bulk). Returns (message_id, trace_id) per payload."""
        if queue_name not in self.queues:
            raise QueueNotFound(queue_name)
        ids: list[tuple[str, str]] = []
        chunks = payload_envelopes(queue_name, actor_name, payloads, trace_id, self.settings.max_payload_bytes, ids)
        send_in_bulk(self, [queue_name], chunks if len(payloads) > SEND_BATCH_SIZE else list(chunks), delay_ms)
        from fleet.shared.metrics import metrics

        metrics().enqueued.labels(queue_name).inc(len(ids))
        return ids

    # -- consuming ---------------------------------------------------------
    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 30000) -> Consumer:
        if queue_name not in self.queues:
            raise QueueNotFound(queue_name)
        return PgmqConsumer(self, queue_name, prefetch, timeout)

    def notifier(self) -> Notifier | None:
        if self.settings.uses_pooler:
            return None  # LISTEN does not survive a transaction pooler: poll instead
        if self._notifier is None:
            with self._states_lock:
                if self._notifier is None:
                    self._notifier = Notifier(self)
                    self._notifier.start()
        return self._notifier

    def heartbeat(self) -> Heartbeat:
        if self._heartbeat is None:
            with self._states_lock:
                if self._heartbeat is None:
                    self._heartbeat = Heartbeat(self)
                    self._heartbeat.start()
        return self._heartbeat

    def actor_for_queue(self, queue_name: str, raw: Any) -> str:
        names = sorted(a.actor_name for a in self.actors.values() if a.queue_name == queue_name)
        if len(names) == 1:
            return names[0]
        if isinstance(raw, dict) and raw.get("actor") in names:
            return raw["actor"]
        if not names:
            raise LookupError(f"no actor consumes queue {queue_name!r}")
        raise LookupError(f"queue {queue_name!r} has several actors ({', '.join(names)}): name one in the 'actor' key")

    # -- housekeeping ------------------------------------------------------
    def flush(self, queue_name: str) -> None:
        with self.pool.connection() as conn:
            self.ensure_queue(queue_name, conn)
            conn.execute("select pgmq.purge_queue(%s)", (queue_name,))

    def flush_all(self) -> None:
        for queue_name in self.queues:
            self.flush(queue_name)

    def pending(self, queue_name: str) -> int:
        with self.pool.connection() as conn:
            self.ensure_queue(queue_name, conn)
            table = sql.Identifier(f"q_{queue_name}")
            return conn.execute(sql.SQL("select count(*) from pgmq.{}").format(table)).fetchone()[0]

    def join(self, queue_name: str, *, timeout: int | None = None) -> None:
        """Wait until the queue holds no message (tests and the demo)."""
        deadline = timeout and time.monotonic() + timeout / 1000
        while self.pending(queue_name):
            if deadline and time.monotonic() > deadline:
                raise dramatiq.errors.QueueJoinTimeout(queue_name)
            time.sleep(0.05)

    def close(self) -> None:
        for thread in (self._notifier, self._heartbeat):
            if thread is not None:
                thread.stop()
