"""dramatiq's RedisBroker, with each job's acknowledgement held until its `bus_events` rows are committed.

Stock dramatiq acknowledges a message from the worker thread that ran it, one Redis round trip each; the
fleet's events live in Postgres, and writing them before each ack cost a Postgres round trip per job.
Here a worker thread hands its ack (or nack) to one writer thread per process, which, in a loop:
1. takes every ack waiting (the batch),
2. inserts every buffered event in one statement and commits it: this includes all the events of the
   batch's jobs, emitted before their acks were handed over,
3. only then sends the batch's acks to Redis, pipelined in one round trip.
When the insert fails (Postgres down, a refused write), nothing is acknowledged: the batch waits and the
writer tries again (after a lost connection at once, then with backoff: fleet.shared.reconnect); the
messages stay in Redis's ack set, so a worker that dies meanwhile leaves them to be redelivered. Held
acks count against the consumer's prefetch, so a worker whose events cannot be written stops taking new
messages.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis
import structlog
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.common import current_millis
from dramatiq.errors import ConnectionClosed
from dramatiq.message import Message

from fleet.shared import events
from fleet.shared.brokers.hooks import ImplementedHooksOnly
from fleet.shared.capabilities import REDIS
from fleet.shared.reconnect import DB_CONNECTION_LOST, Reconnects
from fleet.shared.redact import redact

log = structlog.get_logger(__name__)

# Many acks in one call (ack_many.lua, beside this module). Maintenance rides on the consumers' fetches,
# dramatiq's own script.
ACK_MANY = (Path(__file__).parent / "ack_many.lua").read_text()
# A lost connection to Postgres or to Redis: the writer reconnects (fleet.shared.reconnect).
CONNECTION_LOST = (*DB_CONNECTION_LOST, redis.ConnectionError, redis.TimeoutError)
IDLE_FLUSH_S = 0.05  # events that no ack waits for (a producer's, a retry's) are written this often
MAX_BACKOFF_S = 2.0
CLOSE_WAIT_S = 10.0
GATHER_AT, GATHER_S = 16, 0.002  # a batch smaller than this waits this long for more acks


@dataclass(frozen=True)
class HeldAck:
    consumer: _HeldAckConsumer
    command: str  # "ack" or "nack"
    redis_message_id: str
    message_id: str


class FleetRedisBroker(ImplementedHooksOnly, RedisBroker):
    capabilities = REDIS  # JobEvents leaves the events to the ack writer

    def worker_alive(self, worker_id: str) -> bool:
        """Alive as dramatiq's RedisBroker decides it: a heartbeat within its heartbeat timeout (its
        maintenance puts a dead worker's unacknowledged messages back)."""
        beat = self.client.zscore(f"{self.namespace}:__heartbeats__", worker_id)
        return beat is not None and beat >= time.time() * 1000 - self.heartbeat_timeout

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._ack_many = self.client.register_script(ACK_MANY)
        self._writer: AckWriter | None = None
        self._writer_lock = threading.Lock()

    @property
    def consumer_class(self):
        return _HeldAckConsumer

    def ack_writer(self) -> AckWriter:
        with self._writer_lock:
            if self._writer is None or not self._writer.is_alive():
                events.written_by_ack_writer()  # no background writer: it could race the acks' commit
                self._writer = AckWriter(self)
                self._writer.start()
            return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.stop()
        super().close()

    def send_acks(self, batch: list[HeldAck]) -> None:
        """One pipelined round trip: one ACK_MANY call per queue for the acks, dramatiq's nack per nack."""
        pipe = self.client.pipeline(transaction=False)
        acks: dict[str, list[str]] = {}
        for held in batch:
            if held.command == "ack":
                acks.setdefault(held.consumer.queue_name, []).append(held.redis_message_id)
            else:
                args = [
                    "nack",
                    current_millis(),
                    held.consumer.queue_name,
                    self.broker_id,
                    self.heartbeat_timeout,
                    self.dead_message_ttl,
                    self._should_do_maintenance("nack"),
                    self._max_unpack_size(),
                    held.redis_message_id,
                ]
                self.scripts["dispatch"](keys=[self.namespace], args=args, client=pipe)
        for queue_name, ids in acks.items():
            keys = [
                f"{self.namespace}:__acks__.{self.broker_id}.{queue_name}",
                f"{self.namespace}:{queue_name}.msgs",
                f"{self.namespace}:__heartbeats__",
            ]
            self._ack_many(keys=keys, args=[current_millis(), self.broker_id, *ids], client=pipe)
        pipe.execute()


class AckWriter(threading.Thread):
    def __init__(self, broker: FleetRedisBroker) -> None:
        super().__init__(name="redis-ack-writer", daemon=True)
        self.broker = broker
        self.pending: list[HeldAck] = []
        self.cond = threading.Condition()
        self.running = True
        self.failures = 0  # refused commits in a row (not lost connections)
        self.reconnects = Reconnects("ack-writer")

    def hold(self, held: HeldAck) -> None:
        with self.cond:
            self.pending.append(held)
            self.cond.notify()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Commit what is held (for up to timeout_s), then stop. What cannot be committed stays unacknowledged
        in Redis and is redelivered after the heartbeat timeout."""
        deadline = time.monotonic() + timeout_s
        while self.is_alive() and time.monotonic() < deadline:
            with self.cond:
                if not self.pending:
                    break
            time.sleep(0.01)
        self.running = False
        with self.cond:
            self.cond.notify()
        self.join(timeout=max(deadline - time.monotonic(), 0.1))
        if not self.is_alive():
            events.written_in_background()

    def run(self) -> None:
        while self.running:
            with self.cond:
                if not self.pending:
                    self.cond.wait(IDLE_FLUSH_S)
                small = 0 < len(self.pending) < GATHER_AT
            if small:  # let the other worker threads' acks join this batch: one commit and one round trip for all
                time.sleep(GATHER_S)
            with self.cond:
                batch, self.pending = self.pending, []
            wait = self.commit(batch)
            if wait is not None:
                with self.cond:
                    self.pending[:0] = batch  # nothing of it was acknowledged: hold it for the next try
                time.sleep(wait)

    def commit(self, batch: list[HeldAck]) -> float | None:
        """Events first, then the acks; None when both were done, else how long to wait before the next try
        (nothing acknowledged that is not confirmed)."""
        try:
            wrote = events.flush()
            if batch:
                self.broker.send_acks(batch)
        except CONNECTION_LOST as e:  # the pools replace the lost connection: try again at once, then with backoff
            return self.reconnects.lost(e)
        except Exception as e:  # noqa: BLE001  any failure holds the acks: an ack must never outrun its events
            self.failures += 1
            log.warning(
                "acks.held",
                messages=len(batch),
                error_class=type(e).__name__,
                error=redact(str(e)),
                note="not acknowledged until the events are written",
                attempt=self.failures,
            )
            return min(MAX_BACKOFF_S, 0.05 * 2 ** min(self.failures, 6))
        self.failures = 0
        if wrote or batch:  # a round trip was made: the connections are back
            self.reconnects.restored()
        for held in batch:
            held.consumer.settled(held.message_id)
        return None


class _HeldAckConsumer(_RedisConsumer):
    # A subclass of dramatiq's private consumer: RedisBroker.consumer_class is the one way dramatiq lets a
    # broker change how its consumers acknowledge, and acks held until their events are written are the
    # point of this broker. dramatiq is pinned (pyproject.toml); tests/test_redis_acks.py checks the behaviour.
    def __init__(self, broker, queue_name, prefetch, timeout):
        super().__init__(broker, queue_name, prefetch, timeout)
        self.room = threading.Event()
        self.held: set[str] = set()  # handed to the writer, not yet acknowledged in Redis
        self.writer = broker.ack_writer()
        self.reconnects = Reconnects(f"consumer:{queue_name}")

    def ack(self, message):
        self._hold("ack", message)

    def nack(self, message):
        self._hold("nack", message)

    def _hold(self, command: str, message) -> None:
        # The current queue (self.queue_name) may be the delay queue: dramatiq acks on the queue read from.
        self.held.add(message.message_id)
        self.writer.hold(HeldAck(self, command, message.options["redis_message_id"], message.message_id))

    def settled(self, message_id: str) -> None:
        """Called by the writer once the message's ack reached Redis: it no longer counts against prefetch."""
        self.held.discard(message_id)
        self.queued_message_ids.discard(message_id)
        self.room.set()

    def close(self) -> None:
        """The worker is stopping (its threads are done): put back what was fetched but never handed to the
        worker, then wait a while for the held acks to be committed, so a graceful stop does not leave
        finished jobs to be redelivered and run again."""
        self.requeue_unread()
        deadline = time.monotonic() + CLOSE_WAIT_S
        while self.held and self.writer.is_alive() and time.monotonic() < deadline:
            self.room.clear()
            self.room.wait(0.05)
        if self.held:
            log.warning(
                "acks.unsettled_at_close",
                queue=self.queue_name,
                messages=len(self.held),
                note="not acknowledged: Redis redelivers them after the heartbeat timeout",
            )

    def requeue_unread(self) -> None:
        """dramatiq's consumer fetches a batch into its cache and hands it out one at a time; what is still in
        the cache when the consumer thread stops sits in this worker's ack set, which stock dramatiq leaves to
        be redelivered after the heartbeat timeout. Put it back in the queue now."""
        unread, self.message_cache = [data for data in self.message_cache if data is not None], []
        if not unread:
            return
        try:
            self.requeue(Message.decode(data) for data in unread)
        except redis.ConnectionError as e:
            log.warning(
                "unread.not_requeued",
                queue=self.queue_name,
                messages=len(unread),
                error=redact(str(e)),
                note="Redis redelivers them after the heartbeat timeout",
            )

    def __next__(self):
        # Prefetch full (held acks count): wait for the writer to settle some instead of dramatiq's sleep
        # with backoff, then let the consumer thread loop (it handles delayed messages) and ask again.
        if not self.message_cache and self.outstanding_message_count >= self.prefetch:
            self.room.clear()
            if self.outstanding_message_count >= self.prefetch:
                self.room.wait(self.timeout / 1000)
            return None
        # A lost connection is made again here (redis-py reconnects on the next command), at once and then
        # with backoff, rather than raised to dramatiq's consumer thread, which would wait a fixed 3 s.
        try:
            message = super().__next__()
        except ConnectionClosed as e:
            time.sleep(min(self.reconnects.lost(e), self.timeout / 1000))
            return None
        self.reconnects.restored()
        return message
