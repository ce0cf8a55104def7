"""The one bulk-send path: chunks of encoded envelopes, one `pgmq.send_batch` per chunk, all in one
transaction (on the caller's connection, inside its transaction, when it gives one). A lone chunk on a
pooled connection is one statement, atomic without BEGIN and COMMIT; a lone job is one `pgmq.send`.

A batch of more than one chunk is sent by a thread while the caller's thread encodes the next chunk; a
batch of one chunk (a single enqueue) is sent on the caller's thread, with no thread to start."""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import psycopg
from dramatiq.errors import ConnectionClosed

from fleet.shared.errors import PayloadTooLarge
from fleet.shared.ids import uuid4_strings

if TYPE_CHECKING:
    from fleet.shared.brokers.pgmq.broker import PgmqBroker

SEND_BATCH_SIZE = 1000
Chunk = tuple[str, list[str]]  # (queue name, encoded envelopes)


def send_in_bulk(broker: PgmqBroker, queue_names: Iterable[str], chunks: Iterator[Chunk], delay_ms: int | None,
                 conn: psycopg.Connection | None = None, *, background: bool) -> list[int]:
    """Draw `chunks` (the caller's thread encodes each as it is drawn) and send them atomically; returns the
    pgmq ids. `background`: send on a thread, so encoding and inserting overlap."""
    try:
        if not background:
            return _send(broker, list(queue_names), list(chunks), delay_ms, conn)
        sender = _SenderThread(broker, list(queue_names), delay_ms, conn)
        sender.start()
        try:
            for chunk in chunks:
                if not sender.put(chunk):
                    break
        except BaseException:
            sender.abort()
            raise
        return sender.finish()
    except psycopg.OperationalError as e:
        raise ConnectionClosed(e) from None


def send_encoded(conn: psycopg.Connection, queue_name: str, bodies: list[str], delay_ms: int | None) -> list[int]:
    """One send_batch; the bodies travel as one JSON array (psycopg's text[] escaping is 4x slower). A
    single body goes by pgmq.send, which the server runs in about half the time (no array to build)."""
    if len(bodies) == 1:
        return [_send_one(conn, queue_name, bodies[0], delay_ms)]
    array = "[" + ",".join(bodies) + "]"
    if delay_ms:
        cur = conn.execute(
            "select * from pgmq.send_batch(%s, array(select jsonb_array_elements(%s::jsonb)),"
            " clock_timestamp() + %s * interval '1 millisecond')",
            (queue_name, array, delay_ms),
        )
    else:
        cur = conn.execute("select * from pgmq.send_batch(%s, array(select jsonb_array_elements(%s::jsonb)))",
                           (queue_name, array))
    return [row[0] for row in cur.fetchall()]


def _send_one(conn: psycopg.Connection, queue_name: str, body: str, delay_ms: int | None) -> int:
    if delay_ms:
        cur = conn.execute("select pgmq.send(%s, %s::jsonb, clock_timestamp() + %s * interval '1 millisecond')",
                           (queue_name, body, delay_ms))
    else:
        cur = conn.execute("select pgmq.send(%s, %s::jsonb)", (queue_name, body))
    return cur.fetchone()[0]


def payload_envelopes(queue_name: str, actor_name: str, payloads: list, trace_id: str | None, max_bytes: int,
                      ids: list[tuple[str, str]]) -> Iterator[Chunk]:
    """Envelopes written as JSON text directly (no Message objects), a chunk at a time; appends each
    job's (message id, trace id) to `ids` as it is encoded."""
    head = f'{{"queue_name":{json.dumps(queue_name)},"actor_name":{json.dumps(actor_name)},"args":['
    for start in range(0, len(payloads), SEND_BATCH_SIZE):
        now_ms = int(time.time() * 1000)
        chunk = payloads[start : start + SEND_BATCH_SIZE]
        message_ids = uuid4_strings(len(chunk))
        traces = [trace_id] * len(chunk) if trace_id else uuid4_strings(len(chunk))
        bodies = []
        for payload, message_id, trace in zip(chunk, message_ids, traces):
            body = (f'{head}{json.dumps(payload)}],"kwargs":{{}},"options":{{"trace_id":"{trace}"}},'
                    f'"message_id":"{message_id}","message_timestamp":{now_ms}}}')
            if len(body) > max_bytes:
                raise PayloadTooLarge(f"payload of {len(body)} bytes exceeds FLEET_MAX_PAYLOAD_BYTES ({max_bytes})")
            bodies.append(body)
            ids.append((message_id, trace))
        yield queue_name, bodies


@contextlib.contextmanager
def _connection(broker: PgmqBroker, conn: psycopg.Connection | None):
    if conn is not None:
        yield conn
    else:
        with broker.pool.connection() as pooled:
            yield pooled


def _send(broker: PgmqBroker, queue_names: list[str], chunks: Iterable[Chunk], delay_ms: int | None,
          conn: psycopg.Connection | None) -> list[int]:
    with _connection(broker, conn) as c:
        for queue_name in queue_names:
            broker.ensure_queue(queue_name, c)
        if conn is None and isinstance(chunks, list) and len(chunks) == 1:
            # One statement on a pooled (autocommit) connection is atomic by itself: BEGIN and COMMIT
            # would be two more round trips for every single enqueue.
            return send_encoded(c, *chunks[0], delay_ms)
        ids: list[int] = []
        with c.transaction():
            for queue_name, bodies in chunks:
                ids += send_encoded(c, queue_name, bodies, delay_ms)
        return ids


class _Aborted(Exception):
    pass


class _SenderThread(threading.Thread):
    """Sends the chunks the caller's thread puts, in one transaction; an error is handed back by finish()."""

    _DONE = object()

    def __init__(self, broker: PgmqBroker, queue_names: list[str], delay_ms: int | None,
                 conn: psycopg.Connection | None) -> None:
        super().__init__(name="pgmq-sender", daemon=True)
        self.broker, self.queue_names, self.delay_ms, self.conn = broker, queue_names, delay_ms, conn
        self.chunks: queue.Queue = queue.Queue(maxsize=2)
        self.ids: list[int] = []
        self.error: BaseException | None = None
        self.aborted = False
        self.done_taken = False  # the caller has put its last chunk and waits in finish() or abort()

    def put(self, chunk: Chunk) -> bool:
        if self.error is not None:
            return False
        self.chunks.put(chunk)
        return True

    def abort(self) -> None:
        self.aborted = True
        self.chunks.put(self._DONE)
        self.join()

    def finish(self) -> list[int]:
        self.chunks.put(self._DONE)
        self.join()
        if self.error is not None:
            raise self.error
        return self.ids

    def run(self) -> None:
        try:
            self.ids = _send(self.broker, self.queue_names, self._taken(), self.delay_ms, self.conn)
        except _Aborted:
            pass
        except BaseException as e:  # handed to the caller's thread by finish()
            self.error = e
            while not self.done_taken and self.chunks.get() is not self._DONE:  # let the caller finish putting
                pass

    def _taken(self) -> Iterator[Chunk]:
        while (chunk := self.chunks.get()) is not self._DONE:
            yield chunk
        self.done_taken = True  # a failure from here on (the commit) must not wait for another _DONE
        if self.aborted:
            raise _Aborted()  # inside the transaction: nothing sent is kept
