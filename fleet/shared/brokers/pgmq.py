"""A dramatiq broker on pgmq, the Postgres message queue (Supabase Queues).

dramatiq            pgmq
declare_queue       pgmq.create (idempotent, done lazily on first use)
enqueue(delay)      pgmq.send / send_batch, delay as the message's visibility time
consume(prefetch)   pgmq.read(qty = free prefetch slots), woken by LISTEN/NOTIFY (a statement trigger on the queue table), polled as a fallback
in progress         visibility timeout extended by a heartbeat thread (set_vt on all outstanding ids)
ack                 pgmq.delete, batched
nack                pgmq.archive, batched (the DeadLetters middleware records the reason)
requeue             set_vt(ids, 0): another worker takes them at once

A message that is not a dramatiq envelope (a producer's `select pgmq.send('embed', '{...}')`)
is wrapped into a message for the queue's actor with the JSON as its one argument.
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import dramatiq
import psycopg
import structlog
from dramatiq.broker import Broker, Consumer, MessageProxy
from dramatiq.errors import ConnectionClosed, QueueNotFound
from dramatiq.middleware import Middleware, MiddlewareError
from psycopg import sql
from psycopg.types.string import TextLoader

from fleet.shared.config import Settings, get_settings
from fleet.shared.db import connect_kwargs, database_dsn, get_pool
from fleet.shared import events
from fleet.shared.deadletters import DeadLetter, record_dead_letter
from fleet.shared.durable import HOLD_ACK
from fleet.shared.errors import PayloadTooLarge
from fleet.shared.payloads import MAX_DEPTH, problem
from fleet.shared.redact import redact
from fleet.shared.ids import uuid4_strings

log = structlog.get_logger(__name__)

QUEUE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,46}$")
ENVELOPE_FIELDS = {"queue_name", "actor_name", "args", "kwargs", "options", "message_id", "message_timestamp"}
SEND_BATCH_SIZE = 1000
ACK_FLUSH_AT = 256
MAX_DELIVERIES = 20  # a message read this often without being acked keeps killing its worker


def validate_queue_name(name: str) -> str:
    if not QUEUE_NAME.match(name):
        raise ValueError(f"invalid queue name {name!r}: lowercase letters, digits and _ (max 47), starting with a letter")
    return name


class _JsonbAsText(TextLoader):
    """Read jsonb as text: the consumer checks size and decodes itself."""


class PgmqMessage(MessageProxy):
    """A delivered message and its pgmq identity. `from_sql` is set by the consumer alone, when it wrapped a
    raw JSON job (not an envelope): nothing in a message's content can set it."""

    def __init__(self, message: dramatiq.Message, pgmq_id: int, read_ct: int, *, from_sql: bool = False) -> None:
        super().__init__(message)
        self.pgmq_id = pgmq_id
        self.read_ct = read_ct
        self.from_sql = from_sql


@dataclass
class _QueueState:
    """Per-queue bookkeeping shared by every consumer instance of this process."""

    wake: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    outstanding: set[int] = field(default_factory=set)  # read, not yet acked: the heartbeat keeps them invisible
    acks: list[int] = field(default_factory=list)
    nacks: list[int] = field(default_factory=list)
    durable: bool = False  # the pending acks include a failed attempt's: commit them synchronously


class PgmqBroker(Broker):
    events_ride_with_acks = True  # the consumer inserts the jobs' bus_events in its ack transaction
    redelivers_held_messages = True  # a message held back from its ack (HOLD_ACK) returns after its vt

    def __init__(self, *, settings: Settings | None = None, middleware=None) -> None:
        super().__init__(middleware=middleware)
        self.settings = settings or get_settings()
        self.dsn = database_dsn(self.settings)
        self.queues: dict[str, bool] = {}
        self._created: set[str] = set()
        self._states: dict[str, _QueueState] = {}
        self._states_lock = threading.Lock()
        self._notifier: _Notifier | None = None
        self._heartbeat: _Heartbeat | None = None

    # -- signals -----------------------------------------------------------
    # dramatiq calls every middleware's hook for every signal; most are the base class's no-op.
    # Calling only the middleware that implement a hook keeps enqueue_many's per-message cost low.
    def add_middleware(self, middleware, *, before=None, after=None) -> None:
        super().add_middleware(middleware, before=before, after=after)
        self._hooks = {}

    def _implementing(self, name: str) -> list:
        hooks = self.__dict__.setdefault("_hooks", {})
        if name not in hooks:
            base = getattr(Middleware, name, None)
            hooks[name] = [m for m in self.middleware if getattr(type(m), name, None) is not base]
        return hooks[name]

    def emit_before(self, signal: str, *args: Any, **kwargs: Any) -> None:
        for middleware in self._implementing("before_" + signal):
            try:
                getattr(middleware, "before_" + signal)(self, *args, **kwargs)
            except MiddlewareError:
                raise
            except Exception:
                self.logger.critical("Unexpected failure in before_%s of %r.", signal, middleware, exc_info=True)

    def emit_after(self, signal: str, *args: Any, **kwargs: Any) -> None:
        for middleware in reversed(self._implementing("after_" + signal)):
            try:
                getattr(middleware, "after_" + signal)(self, *args, **kwargs)
            except Exception:
                self.logger.critical("Unexpected failure in after_%s of %r.", signal, middleware, exc_info=True)

    # -- connections -------------------------------------------------------
    @property
    def pool(self):
        return get_pool()

    def connect(self) -> psycopg.Connection:
        try:
            return psycopg.connect(self.dsn, **connect_kwargs(self.settings))
        except psycopg.OperationalError as e:
            raise ConnectionClosed(e) from None

    def state(self, queue_name: str) -> _QueueState:
        with self._states_lock:
            return self._states.setdefault(queue_name, _QueueState())

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
                "select 1 from pg_trigger t join pg_class r on r.oid = t.tgrelid join pg_namespace n on n.oid = r.relnamespace"
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

    def enqueue_many(self, messages: Iterable[dramatiq.Message], *, delay: int | None = None,
                     conn: psycopg.Connection | None = None) -> list[int]:
        """Enqueue many messages atomically: one `pgmq.send_batch` per queue and chunk of 1,000,
        pipelined so the next chunk is encoded while Postgres inserts the previous one. With `conn`, inside
        the caller's transaction on that connection (the SDK claims idempotency keys in the same one)."""
        by_queue: dict[str, list[dramatiq.Message]] = {}
        for message in messages:
            if message.queue_name not in self.queues:
                raise QueueNotFound(message.queue_name)
            by_queue.setdefault(message.queue_name, []).append(message)
        try:
            if conn is not None:
                ids = self._send_messages(conn, by_queue, delay)
            else:
                with self.pool.connection() as pooled:
                    ids = self._send_messages(pooled, by_queue, delay)
        except psycopg.OperationalError as e:
            raise ConnectionClosed(e) from None
        for batch in by_queue.values():
            for message in batch:
                self.emit_after("enqueue", message, delay)
        return ids

    def _send_messages(self, conn: psycopg.Connection, by_queue: dict[str, list[dramatiq.Message]],
                       delay: int | None) -> list[int]:
        cursors = []
        for queue_name in by_queue:
            self.ensure_queue(queue_name, conn)
        with conn.transaction(), conn.pipeline():
            for queue_name, batch in by_queue.items():
                for start in range(0, len(batch), SEND_BATCH_SIZE):
                    chunk = batch[start : start + SEND_BATCH_SIZE]
                    for message in chunk:
                        self.emit_before("enqueue", message, delay)
                    cursors.append(self.send_encoded(conn, queue_name, [m.encode().decode() for m in chunk], delay))
        return [row[0] for cur in cursors for row in cur.fetchall()]

    # Middleware whose enqueue hooks the bulk path does the work of: trace ids in SQL, metrics once per batch.
    BULK_SAFE_MIDDLEWARE = ("TraceContext", "Metrics")

    def can_enqueue_in_bulk(self) -> bool:
        hooked = self._implementing("before_enqueue") + self._implementing("after_enqueue")
        return all(type(m).__name__ in self.BULK_SAFE_MIDDLEWARE for m in hooked)

    def enqueue_payloads(self, queue_name: str, actor_name: str, payloads: list, *, trace_id: str | None = None,
                         delay_ms: int | None = None) -> list[tuple[str, str]]:
        """Bulk path for producers, atomic per call: envelopes are written as JSON text directly (no
        Message objects, no per-message hooks), and a sender thread inserts chunk N while chunk N+1 is
        encoded. Only when no middleware must see each message (see can_enqueue_in_bulk).
        Returns (message_id, trace_id) per payload."""
        if queue_name not in self.queues:
            raise QueueNotFound(queue_name)
        head = f'{{"queue_name":{json.dumps(queue_name)},"actor_name":{json.dumps(actor_name)},"args":['
        limit = self.settings.max_payload_bytes
        ids: list[tuple[str, str]] = []
        chunks: queue.Queue = queue.Queue(maxsize=2)
        sender = _ChunkSender(self, queue_name, delay_ms, chunks)
        sender.start()
        try:
            for start in range(0, len(payloads), SEND_BATCH_SIZE):
                bodies = []
                now_ms = int(time.time() * 1000)
                chunk = payloads[start : start + SEND_BATCH_SIZE]
                message_ids = uuid4_strings(len(chunk))
                traces = [trace_id] * len(chunk) if trace_id else uuid4_strings(len(chunk))
                for payload, message_id, trace in zip(chunk, message_ids, traces):
                    body = (f'{head}{json.dumps(payload)}],"kwargs":{{}},"options":{{"trace_id":"{trace}"}},'
                            f'"message_id":"{message_id}","message_timestamp":{now_ms}}}')
                    if len(body) > limit:
                        raise PayloadTooLarge(f"payload of {len(body)} bytes exceeds FLEET_MAX_PAYLOAD_BYTES ({limit})")
                    bodies.append(body)
                    ids.append((message_id, trace))
                if not sender.put(bodies):
                    break
        except BaseException:
            sender.abort()
            raise
        sender.finish()
        from fleet.shared.metrics import metrics

        metrics().enqueued.labels(queue_name).inc(len(ids))
        return ids

    @staticmethod
    def send_encoded(conn: psycopg.Connection, queue_name: str, bodies: list[str], delay_ms: int | None) -> psycopg.Cursor:
        """One send_batch; the bodies travel as one JSON array (psycopg's text[] escaping is 4x slower)."""
        array = "[" + ",".join(bodies) + "]"
        if delay_ms:
            return conn.execute(
                "select * from pgmq.send_batch(%s, array(select jsonb_array_elements(%s::jsonb)),"
                " clock_timestamp() + %s * interval '1 millisecond')",
                (queue_name, array, delay_ms),
            )
        return conn.execute("select * from pgmq.send_batch(%s, array(select jsonb_array_elements(%s::jsonb)))",
                            (queue_name, array))

    # -- consuming ---------------------------------------------------------
    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 30000) -> Consumer:
        if queue_name not in self.queues:
            raise QueueNotFound(queue_name)
        return _PgmqConsumer(self, queue_name, prefetch, timeout)

    def notifier(self) -> _Notifier | None:
        if self.settings.uses_pooler:
            return None  # LISTEN does not survive a transaction pooler: poll instead
        if self._notifier is None:
            with self._states_lock:
                if self._notifier is None:
                    self._notifier = _Notifier(self)
                    self._notifier.start()
        return self._notifier

    def heartbeat(self) -> _Heartbeat:
        if self._heartbeat is None:
            with self._states_lock:
                if self._heartbeat is None:
                    self._heartbeat = _Heartbeat(self)
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


class _PgmqConsumer(Consumer):
    def __init__(self, broker: PgmqBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        self.broker = broker
        self.queue_name = queue_name
        self.prefetch = max(1, prefetch)
        self.timeout = timeout / 1000
        self.settings = broker.settings
        self.state = broker.state(queue_name)
        self.buffer: deque[PgmqMessage] = deque()
        self.refusals = 0  # round trips refused in a row (not connection errors): they set a backoff
        self.backoff_until = 0.0
        self.conn = broker.connect()
        self.conn.adapters.register_loader("jsonb", _JsonbAsText)
        self.table = sql.Identifier(f"q_{queue_name}")
        try:
            broker.ensure_queue(queue_name, self.conn)
        except psycopg.OperationalError as e:
            raise ConnectionClosed(e) from None
        events.written_with_acks(queue_name)
        self.notifier = broker.notifier()
        if self.notifier is not None:
            self.notifier.listen(queue_name)
        broker.heartbeat()

    # Called from worker threads: only queue the ids; the consumer thread sends them in batches.
    def ack(self, message: PgmqMessage) -> None:
        with self.state.lock:
            if message.options.pop(HOLD_ACK, False):
                # Its retry could not be enqueued: stop the heartbeat so pgmq delivers it again after the vt.
                self.state.outstanding.discard(message.pgmq_id)
                return
            self.state.acks.append(message.pgmq_id)
            if getattr(message, "_exception", None) is not None:  # retried or deferred: its successor is enqueued
                self.state.durable = True
        self.state.wake.set()

    def nack(self, message: PgmqMessage) -> None:
        with self.state.lock:
            self.state.nacks.append(message.pgmq_id)
        self.state.wake.set()

    def requeue(self, messages: Iterable[PgmqMessage]) -> None:
        ids = [m.pgmq_id for m in messages if isinstance(m, PgmqMessage)]
        if not ids:
            return
        try:
            self.conn.execute("select pgmq.set_vt(%s, %s::bigint[], 0)", (self.queue_name, ids))
        except psycopg.Error as e:
            log.warning("requeue.failed", queue=self.queue_name, count=len(ids), error=str(e),
                        note="they come back when their visibility timeout ends")
        finally:
            self._let_go(ids)  # returned, or left to their visibility timeout: the heartbeat stops either way

    def _let_go(self, ids: list[int]) -> None:
        with self.state.lock:
            self.state.outstanding.difference_update(ids)

    def close(self) -> None:
        """Flush the settled ids and return the prefetched messages that never started. Should the connection
        be gone, the settled ids wait in the shared state for this queue's next consumer, and the prefetched
        ones are let go (no heartbeat, no prefetch slot), so pgmq delivers them again after their vt."""
        try:
            self._flush()
        except ConnectionClosed:
            pass
        finally:
            try:
                self.requeue(list(self.buffer))
            finally:
                self.buffer.clear()
                self.conn.close()

    def __next__(self) -> MessageProxy | None:
        deadline = time.monotonic() + self.timeout
        while True:
            self.state.wake.clear()
            if self.buffer:
                if len(self.state.acks) >= ACK_FLUSH_AT:
                    self._flush()
                return self.buffer.popleft()
            # Acked-but-unsent ids count as free: read again once half the prefetch is free, so each
            # round trip carries a batch of acks and a batch of messages rather than one of each.
            with self.state.lock:
                settled = len(self.state.acks) + len(self.state.nacks)
                busy = len(self.state.outstanding) - settled
            room = self.prefetch - busy
            backing_off = self.backoff_until - time.monotonic()
            if backing_off <= 0 and (room >= (self.prefetch + 1) // 2 or busy == 0):
                if self._exchange(room):
                    continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if backing_off <= 0:
                    self._flush()
                return None
            if backing_off > 0:
                time.sleep(min(remaining, backing_off))
                continue
            self.state.wake.wait(self._idle_wait(remaining, busy == 0))

    def _idle_wait(self, remaining: float, idle: bool) -> float:
        wait = min(remaining, self.settings.poll_interval_ms / 1000)
        if not idle:
            return wait  # busy: an ack wakes us
        try:
            # Delayed and retried messages become visible without a NOTIFY: wake when the next one does.
            row = self.conn.execute(
                sql.SQL("select extract(epoch from min(vt) - clock_timestamp()) from pgmq.{}").format(self.table)
            ).fetchone()
        except psycopg.OperationalError as e:
            raise ConnectionClosed(e) from None
        if row and row[0] is not None:
            wait = min(wait, max(float(row[0]), 0.001))
        return wait

    def _flush(self) -> None:
        self._exchange(0)

    def _exchange(self, qty: int) -> bool:
        """One round trip and one transaction: delete the acked ids, archive the rejected ones and read
        up to `qty` new messages. Returns True when messages were buffered."""
        state = self.state
        with state.lock:
            acks, state.acks = state.acks, []
            nacks, state.nacks = state.nacks, []
            durable, state.durable = state.durable or bool(nacks), False
        if not acks and not nacks and qty <= 0:
            return False
        # This queue's bus_events ride along, so they commit with the acks that end those jobs.
        event_rows = events.take(self.queue_name)
        try:
            rows = self.conn.execute(
                "select msg_id, read_ct, extract(epoch from enqueued_at), message"
                " from fleet_ack_and_read(%s, %s::bigint[], %s::bigint[], %s, %s, %s::jsonb, %s)",
                (self.queue_name, acks, nacks, self.settings.visibility_timeout_s, max(qty, 0),
                 events.as_json_array(event_rows) if event_rows else None, not durable),
            ).fetchall()
        except psycopg.Error as e:
            events.put_back(event_rows)
            with state.lock:  # keep them for the next round trip (or the next consumer instance)
                state.acks[:0] = acks
                state.nacks[:0] = nacks
                state.durable = state.durable or durable
            if isinstance(e, (psycopg.OperationalError, psycopg.InterfaceError)):
                raise ConnectionClosed(e) from None
            self._refused(e)
            return False
        self.refusals = 0
        with state.lock:
            state.outstanding.difference_update(acks)
            state.outstanding.difference_update(nacks)
            state.outstanding.update(row[0] for row in rows)
        rejected: list[int] = []
        for msg_id, read_ct, enqueued_at, body in rows:
            # Nothing raised here may strand the batch: each message is buffered, dead-lettered, or let go.
            try:
                message, from_sql = self._decode(msg_id, enqueued_at, body)
                if read_ct > MAX_DELIVERIES:
                    raise _Undeliverable(f"delivered {read_ct} times without being acknowledged (the job keeps killing its worker)")
            except Exception as e:
                reason = str(e) if isinstance(e, _Undeliverable) else f"could not decode the message: {type(e).__name__}: {e}"
                try:
                    self._dead_letter(msg_id, read_ct, body, reason)
                    rejected.append(msg_id)
                except Exception:
                    log.exception("dead_letter.record_failed", queue=self.queue_name, msg_id=msg_id)
                    with state.lock:  # no heartbeat: pgmq delivers it again after the visibility timeout
                        state.outstanding.discard(msg_id)
                continue
            self.buffer.append(PgmqMessage(message, msg_id, read_ct, from_sql=from_sql))
        if rejected:
            with state.lock:
                state.nacks.extend(rejected)
        return bool(self.buffer)

    def _refused(self, error: psycopg.Error) -> None:
        """The database refused the round trip for a reason other than a lost connection (a data or permission
        error, a trigger): reconnecting would not help and retrying at once would spin. Say so loudly, count
        it, and back off exponentially (up to 30 s) before the next round trip."""
        from fleet.shared.metrics import metrics

        self.refusals += 1
        delay = min(30.0, 0.5 * 2 ** (self.refusals - 1))
        self.backoff_until = time.monotonic() + delay
        metrics().consumer_errors.labels(self.queue_name, type(error).__name__).inc()
        log.error("consumer.round_trip_refused", queue=self.queue_name, error_class=type(error).__name__,
                  error=redact(str(error)), retry_in_s=delay, refusals=self.refusals)

    def _decode(self, msg_id: int, enqueued_at, body: str) -> tuple[dramatiq.Message, bool]:
        """The message, and whether it was a raw JSON job wrapped here (True) rather than an envelope."""
        if len(body) > self.settings.max_payload_bytes:
            raise _Undeliverable(f"message of {len(body)} bytes exceeds FLEET_MAX_PAYLOAD_BYTES ({self.settings.max_payload_bytes})")
        try:
            data = json.loads(body)
        except ValueError as e:
            raise _Undeliverable(f"message is not valid JSON: {e}") from None
        except RecursionError:
            raise _Undeliverable(f"message nested too deeply to decode (the limit is {MAX_DEPTH} levels)") from None
        if isinstance(data, dict) and ENVELOPE_FIELDS <= data.keys():
            try:
                fields = {k: data[k] for k in ENVELOPE_FIELDS}
                if not isinstance(fields["args"], list) or not isinstance(fields["kwargs"], dict) or not isinstance(fields["options"], dict):
                    raise TypeError("args must be a list, kwargs and options objects")
                fields["args"] = tuple(fields["args"])
                if (why := problem(fields["args"])) is not None:
                    raise ValueError(why)
                if fields["queue_name"] != self.queue_name:
                    raise ValueError(f"envelope names queue {fields['queue_name']!r} but was read from {self.queue_name!r}")
                return dramatiq.Message(**fields), False
            except (TypeError, ValueError) as e:
                raise _Undeliverable(f"malformed message envelope: {e}") from None
        # A raw JSON job from SQL or another producer: wrap it for the queue's actor.
        if not isinstance(data, dict):
            raise _Undeliverable(f"a raw message must be a JSON object, got {type(data).__name__}")
        try:
            actor_name = self.broker.actor_for_queue(self.queue_name, data)
        except LookupError as e:
            raise _Undeliverable(str(e)) from None
        payload = data["payload"] if "actor" in data and isinstance(data.get("payload"), dict) else data
        if (why := problem(payload)) is not None:
            raise _Undeliverable(f"raw message refused: {why}")
        options: dict[str, Any] = {"raw": True}
        return dramatiq.Message(
            queue_name=self.queue_name, actor_name=actor_name, args=(payload,), kwargs={},
            options=options, message_id=f"pgmq:{self.queue_name}:{msg_id}",
            message_timestamp=int(float(enqueued_at) * 1000),
        ), True

    def _dead_letter(self, msg_id: int, read_ct: int, body: str, reason: str) -> None:
        job_id, actor, trace_id = _identity(body)
        record_dead_letter(DeadLetter(
            queue=self.queue_name, actor=actor, message_id=job_id or f"pgmq:{self.queue_name}:{msg_id}", message=None,
            raw=body[:10_000], reason=reason, error_class="UndeliverableMessage", error=reason, attempts=read_ct,
            trace_id=trace_id,
        ))
        log.warning("message.undeliverable", queue=self.queue_name, pgmq_id=msg_id, reason=reason)


class _Undeliverable(Exception):
    pass


def _identity(body: str) -> tuple[str | None, str | None, str | None]:
    """The job id, actor and trace id of an undeliverable envelope, when it has them, so its dead letter
    and job.dead event carry the ids its producer knows."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None, None, None
    if not isinstance(data, dict):
        return None, None, None
    options = data.get("options") if isinstance(data.get("options"), dict) else {}
    return tuple(v if isinstance(v, str) else None
                 for v in (data.get("message_id"), data.get("actor_name"), options.get("trace_id")))


class _ChunkSender(threading.Thread):
    """Sends chunks of encoded envelopes in one transaction while the producer encodes the next chunk."""

    _DONE = object()

    def __init__(self, broker: PgmqBroker, queue_name: str, delay_ms: int | None, chunks: queue.Queue) -> None:
        super().__init__(name="pgmq-sender", daemon=True)
        self.broker, self.queue_name, self.delay_ms, self.chunks = broker, queue_name, delay_ms, chunks
        self.error: BaseException | None = None
        self.aborted = False

    def put(self, bodies: list[str]) -> bool:
        if self.error is not None:
            return False
        self.chunks.put(bodies)
        return True

    def abort(self) -> None:
        self.aborted = True
        self.chunks.put(self._DONE)
        self.join()

    def finish(self) -> None:
        self.chunks.put(self._DONE)
        self.join()
        if self.error is not None:
            if isinstance(self.error, psycopg.OperationalError):
                raise ConnectionClosed(self.error) from None
            raise self.error

    def run(self) -> None:
        try:
            with self.broker.pool.connection() as conn:
                self.broker.ensure_queue(self.queue_name, conn)
                with conn.transaction():
                    while (bodies := self.chunks.get()) is not self._DONE:
                        self.broker.send_encoded(conn, self.queue_name, bodies, self.delay_ms)
                    if self.aborted:
                        raise _Aborted()
        except _Aborted:
            pass
        except BaseException as e:  # handed to the producer thread by finish()
            self.error = e
            while self.chunks.get() is not self._DONE:  # let the producer finish putting
                pass


class _Aborted(Exception):
    pass


class _Notifier(threading.Thread):
    """One LISTEN connection per process: pgmq's insert trigger wakes the consumers of that queue."""

    def __init__(self, broker: PgmqBroker) -> None:
        super().__init__(name="pgmq-notifier", daemon=True)
        self.broker = broker
        self.channels: dict[str, str] = {}  # channel -> queue
        self.pending: dict[str, threading.Event] = {}
        self.lock = threading.Lock()
        self.running = True

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
                    with self.lock:
                        self.pending.update({c: threading.Event() for c in self.channels})
                        self.channels.clear()
                    for state in list(self.broker._states.values()):
                        state.wake.set()  # notifications may have been missed while disconnected
                    while self.running:
                        self._subscribe(conn)
                        for note in conn.notifies(timeout=0.25):
                            queue = self.channels.get(note.channel)
                            if queue is not None:
                                self.broker.state(queue).wake.set()
            except psycopg.Error as e:
                if self.running:
                    log.warning("notifier.reconnecting", error=str(e))
                    time.sleep(0.5)

    def _subscribe(self, conn: psycopg.Connection) -> None:
        with self.lock:
            pending, self.pending = self.pending, {}
        for channel, done in pending.items():
            conn.execute(sql.SQL("listen {}").format(sql.Identifier(channel)))
            with self.lock:
                self.channels[channel] = channel[len("pgmq.q_") : -len(".INSERT")]
            done.set()


class _Heartbeat(threading.Thread):
    """Keeps every outstanding message invisible while this process is alive.

    A dead process stops beating, so its messages reappear within one visibility timeout.
    """

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
                for queue_name, state in list(self.broker._states.items()):
                    with state.lock:
                        ids = list(state.outstanding)
                    if ids:
                        conn.execute("select count(*) from pgmq.set_vt(%s, %s::bigint[], %s)", (queue_name, ids, self.vt))
            except psycopg.Error as e:
                log.warning("heartbeat.failed", error=str(e))
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()
