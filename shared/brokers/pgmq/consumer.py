"""The pgmq consumer: one connection per queue and worker process; every round trip acks, archives and reads
in one transaction (`fleet_ack_and_read`), with this queue's buffered bus_events riding along."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

import psycopg
import structlog
from dramatiq.broker import Consumer, MessageProxy
from dramatiq.errors import ConnectionClosed
from psycopg import sql

from fleet.shared import events
from fleet.shared.brokers.pgmq.messages import JsonbAsText, PgmqMessage, Undeliverable, decode, identity
from fleet.shared.brokers.pgmq.readahead import ReadAhead
from fleet.shared.deadletters import DeadLetter, record_dead_letter
from fleet.shared.durable import HOLD_ACK
from fleet.shared.reconnect import Reconnects
from fleet.shared.redact import redact

if TYPE_CHECKING:
    from fleet.shared.brokers.pgmq.parts import ConsumerHost

log = structlog.get_logger(__name__)

ACK_FLUSH_AT = 256
MAX_DELIVERIES = 20  # a message read this often without being acked keeps killing its worker


class PgmqConsumer(Consumer):
    def __init__(self, broker: ConsumerHost, queue_name: str, prefetch: int, timeout: int) -> None:
        self.broker = broker
        self.queue_name = queue_name
        self.prefetch = max(1, prefetch)
        self.read_ahead = ReadAhead(self.prefetch)
        self.timeout = timeout / 1000
        self.settings = broker.settings
        self.state = broker.state(queue_name)
        self.buffer: deque[PgmqMessage] = deque()
        self.refusals = 0  # round trips refused in a row (not connection errors): they set a backoff
        self.backoff_until = 0.0
        self.reconnects = Reconnects(f"consumer:{queue_name}")
        self.conn = self._connect()
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
    def ack(self, message: PgmqMessage) -> None:  # type: ignore[override]  # the broker hands its consumer only the messages it made
        with self.state.lock:
            if message.options.pop(HOLD_ACK, False):
                # Its retry could not be enqueued: stop the heartbeat so pgmq delivers it again after the vt.
                self.state.outstanding.discard(message.pgmq_id)
                return
            self.state.acks.append(message.pgmq_id)
            if getattr(message, "_exception", None) is not None:  # retried or deferred: its successor is enqueued
                self.state.durable = True
        self.state.wake.set()

    def nack(self, message: PgmqMessage) -> None:  # type: ignore[override]  # as ack
        with self.state.lock:
            self.state.nacks.append(message.pgmq_id)
        self.state.wake.set()

    def requeue(self, messages: Iterable[PgmqMessage]) -> None:  # type: ignore[override]  # as ack
        ids = [m.pgmq_id for m in messages if isinstance(m, PgmqMessage)]
        if not ids:
            return
        try:
            self.conn.execute("select pgmq.set_vt(%s, %s::bigint[], 0)", (self.queue_name, ids))
        except psycopg.Error as e:
            log.warning(
                "requeue.failed",
                queue=self.queue_name,
                count=len(ids),
                error=str(e),
                note="they come back when their visibility timeout ends",
            )
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
                events.not_written_with_acks(self.queue_name)

    def _connect(self) -> psycopg.Connection:
        conn = self.broker.connect()
        conn.adapters.register_loader("jsonb", JsonbAsText)
        return conn

    def __next__(self) -> MessageProxy | None:
        """The next message, or None within the consumer's timeout. A lost connection is replaced here, at
        once and then with backoff (fleet.shared.reconnect), rather than raised to dramatiq, whose consumer
        thread would wait a fixed 3 s; the acks and prefetched messages in hand are kept meanwhile."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return self._next(deadline)
            except ConnectionClosed as e:
                if not self._reconnect(e, deadline):
                    return None

    def _reconnect(self, error: BaseException, deadline: float) -> bool:
        """Replace the lost connection before `deadline`; False when it is not back yet (the next call goes on
        with the same episode's backoff)."""
        while True:
            delay = self.reconnects.lost(error)
            if time.monotonic() + delay > deadline:
                time.sleep(max(0.0, deadline - time.monotonic()))
                return False
            time.sleep(delay)
            try:
                conn = self._connect()
            except ConnectionClosed as e:
                error = e
                continue
            try:
                self.conn.close()
            except psycopg.Error as e:  # a broken connection may fail to close: it is dropped all the same
                log.info("consumer.close_failed", queue=self.queue_name, error_class=type(e).__name__)
            self.conn = conn
            self.reconnects.restored()
            return True

    def _next(self, deadline: float) -> MessageProxy | None:
        while True:
            self.state.wake.clear()
            if self.buffer:
                if len(self.state.acks) >= ACK_FLUSH_AT:
                    self._flush()
                return self.buffer.popleft()
            # Acked-but-unsent ids count as free: read again once half the limit is free, so each
            # round trip carries a batch of acks and a batch of messages rather than one of each.
            with self.state.lock:
                settled = len(self.state.acks) + len(self.state.nacks)
                busy = len(self.state.outstanding) - settled
            limit = self.read_ahead.limit
            room = limit - busy
            backing_off = self.backoff_until - time.monotonic()
            if backing_off <= 0 and (room >= (limit + 1) // 2 or busy == 0):
                if self._exchange(read=True):
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
        self._exchange(read=False)

    def _exchange(self, read: bool) -> bool:
        """One round trip and one transaction: delete the acked ids, archive the rejected ones and, when
        `read`, read as many new messages as the read-ahead limit leaves room for. Returns True when
        messages were buffered."""
        state = self.state
        with state.lock:
            acks, state.acks = state.acks, []
            nacks, state.nacks = state.nacks, []
            durable, state.durable = state.durable or bool(nacks), False
            busy = len(state.outstanding) - len(acks) - len(nacks)  # read and not yet settled
        # The limit is updated before it sizes this read: a round trip that finds the jobs slow reads no more
        # than the prefetch. (Acks put back by a failed round trip are counted again: a limit, not a tally.)
        self.read_ahead.settled(len(acks) + len(nacks), time.monotonic())
        qty = max(self.read_ahead.limit - busy, 0) if read else 0
        if not acks and not nacks and qty <= 0:
            return False
        # This queue's bus_events ride along, so they commit with the acks that end those jobs.
        event_rows = events.take(self.queue_name)
        try:
            rows = self.conn.execute(
                "select msg_id, read_ct, extract(epoch from enqueued_at), message"
                " from fleet_ack_and_read(%s, %s::bigint[], %s::bigint[], %s, %s, %s::jsonb, %s)",
                (
                    self.queue_name,
                    acks,
                    nacks,
                    self.settings.visibility_timeout_s,
                    max(qty, 0),
                    events.as_json_array(event_rows) if event_rows else None,
                    not durable,
                ),
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
        self._buffer(rows)
        return bool(self.buffer)

    def _buffer(self, rows: list[tuple]) -> None:
        """Nothing raised here may strand the batch: each message is buffered, dead-lettered, or let go."""
        rejected: list[int] = []
        for msg_id, read_ct, enqueued_at, body in rows:
            try:
                message, from_sql = decode(
                    self.queue_name,
                    msg_id,
                    enqueued_at,
                    body,
                    self.settings.max_payload_bytes,
                    self.broker.actor_for_queue,
                )
                if read_ct > MAX_DELIVERIES:
                    raise Undeliverable(
                        f"delivered {read_ct} times without being acknowledged (the job keeps killing its worker)"
                    )
            except Exception as e:  # noqa: BLE001  any message that cannot be decoded is dead-lettered with the reason
                reason = (
                    str(e) if isinstance(e, Undeliverable) else f"could not decode the message: {type(e).__name__}: {e}"
                )
                try:
                    self._dead_letter(msg_id, read_ct, body, reason)
                    rejected.append(msg_id)
                except Exception:
                    log.exception("dead_letter.record_failed", queue=self.queue_name, msg_id=msg_id)
                    with self.state.lock:  # no heartbeat: pgmq delivers it again after the visibility timeout
                        self.state.outstanding.discard(msg_id)
                continue
            self.buffer.append(PgmqMessage(message, msg_id, read_ct, from_sql=from_sql))
        if rejected:
            with self.state.lock:
                self.state.nacks.extend(rejected)

    def _refused(self, error: psycopg.Error) -> None:
        """The database refused the round trip for a reason other than a lost connection (a data or permission
        error, a trigger): reconnecting would not help and retrying at once would spin. Say so loudly, count
        it, and back off exponentially (up to 30 s) before the next round trip."""
        from fleet.shared.metrics import metrics

        self.refusals += 1
        delay = min(30.0, 0.5 * 2 ** (self.refusals - 1))
        self.backoff_until = time.monotonic() + delay
        metrics().consumer_errors.labels(self.queue_name, type(error).__name__).inc()
        log.error(
            "consumer.round_trip_refused",
            queue=self.queue_name,
            error_class=type(error).__name__,
            error=redact(str(error)),
            retry_in_s=delay,
            refusals=self.refusals,
        )

    def _dead_letter(self, msg_id: int, read_ct: int, body: str, reason: str) -> None:
        job_id, actor, trace_id = identity(body)
        record_dead_letter(
            DeadLetter(
                queue=self.queue_name,
                actor=actor,
                message_id=job_id or f"pgmq:{self.queue_name}:{msg_id}",
                message=None,
                raw=body[:10_000],
                reason=reason,
                error_class="UndeliverableMessage",
                error=reason,
                attempts=read_ct,
                trace_id=trace_id,
            )
        )
        log.warning("message.undeliverable", queue=self.queue_name, pgmq_id=msg_id, reason=reason)
