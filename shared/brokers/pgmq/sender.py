"""The one bulk-send path: chunks of encoded envelopes, one `pgmq.send_batch` per chunk, all in one
transaction (on the caller's connection, inside its transaction, when it gives one).

The chunks are sent in psycopg's pipeline mode: the server inserts one chunk while the caller's thread
encodes the next, with no thread and no round trip to wait for between them. A lone chunk on a pooled
connection is one statement, atomic without BEGIN and COMMIT; a lone job is one `pgmq.send`."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import dramatiq
import orjson
import psycopg
from dramatiq.errors import ConnectionClosed

from fleet.shared.errors import PayloadTooLarge
from fleet.shared.ids import uuid4_strings

if TYPE_CHECKING:
    from fleet.shared.brokers.pgmq.parts import QueueCreator

SEND_BATCH_SIZE = 1000
Chunk = tuple[str, list[str]]  # (queue name, encoded envelopes)


def send_in_bulk(
    broker: QueueCreator,
    queue_names: Iterable[str],
    chunks: Iterable[Chunk],
    delay_ms: int | None,
    conn: psycopg.Connection | None = None,
) -> list[int]:
    """Draw `chunks` (the caller's thread encodes each as it is drawn) and send them atomically; returns the
    pgmq ids. Give a batch that fits one chunk as a list: it is then sent as one statement."""
    try:
        with _connection(broker, conn) as c:
            for queue_name in queue_names:
                broker.ensure_queue(queue_name, c)
            if conn is None and isinstance(chunks, list) and len(chunks) == 1:
                # One statement on a pooled (autocommit) connection is atomic by itself: BEGIN and COMMIT
                # would be two more round trips for every single enqueue.
                queue_name, bodies = chunks[0]
                return _fetch_ids(send_encoded(c, queue_name, bodies, delay_ms))
            with c.transaction():
                with c.pipeline():
                    cursors = [send_encoded(c, queue_name, bodies, delay_ms) for queue_name, bodies in chunks]
                return [msg_id for cursor in cursors for msg_id in _fetch_ids(cursor)]
    except psycopg.OperationalError as e:
        raise ConnectionClosed(e) from None


def send_encoded(conn: psycopg.Connection, queue_name: str, bodies: list[str], delay_ms: int | None) -> psycopg.Cursor:
    """One send_batch, whose cursor returns the pgmq ids; the bodies travel as one JSON array (psycopg's
    text[] escaping is 4x slower). A single body goes by pgmq.send, which the server runs in about half
    the time (no array to build)."""
    at = "clock_timestamp() + %s * interval '1 millisecond'"
    if len(bodies) == 1:
        if delay_ms:
            return conn.execute(f"select pgmq.send(%s, %s::jsonb, {at})", (queue_name, bodies[0], delay_ms))
        return conn.execute("select pgmq.send(%s, %s::jsonb)", (queue_name, bodies[0]))
    array = "[" + ",".join(bodies) + "]"
    if delay_ms:
        return conn.execute(
            f"select * from pgmq.send_batch(%s, array(select jsonb_array_elements(%s::jsonb)), {at})",
            (queue_name, array, delay_ms),
        )
    return conn.execute(
        "select * from pgmq.send_batch(%s, array(select jsonb_array_elements(%s::jsonb)))", (queue_name, array)
    )


def _fetch_ids(cursor: psycopg.Cursor) -> list[int]:
    return [row[0] for row in cursor.fetchall()]


def payload_json(payload) -> str:
    """orjson, 7x faster than json.dumps; what it does not encode (an integer beyond 64 bits, a custom
    float) goes by json.dumps. Payloads have passed payloads.problem: no NaN, which orjson writes as null."""
    try:
        return orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(payload)


# Stand-ins for the fields that vary per envelope (the payload, trace id, message id and timestamp).
_FIELDS = ("payload", "trace", "message_id", "at")
_STAND_INS = ("\x00payload", "\x00trace", "\x00id")
_AT = -1_111_111_111_111  # negative: no queue or actor name can contain it (they have no "-")


def envelope_encoder(queue_name: str, actor_name: str) -> Callable[[str, str, str, int], str]:
    """dramatiq's own envelope for this actor: `encode(payload JSON, trace id JSON, message id JSON, timestamp)`
    gives exactly what Message.encode() gives. The envelope is encoded once by dramatiq's encoder with
    stand-ins and cut around them, so the bulk path cannot drift from dramatiq's message format."""
    probe: dramatiq.Message[Any] = dramatiq.Message(
        queue_name=queue_name,
        actor_name=actor_name,
        args=(_STAND_INS[0],),
        kwargs={},
        options={"trace_id": _STAND_INS[1]},
        message_id=_STAND_INS[2],
        message_timestamp=_AT,
    )
    text = probe.encode().decode()
    marks = dict(zip(_FIELDS, [json.dumps(value) for value in _STAND_INS] + [str(_AT)], strict=True))
    parts, order, end = [], [], 0
    for start, field in sorted((text.index(mark), field) for field, mark in marks.items()):
        parts.append(text[end:start])
        order.append(field)
        end = start + len(marks[field])
    parts.append(text[end:])
    # An f-string over the parts in dramatiq's order, built once (as collections.namedtuple builds its
    # methods): as fast as one written by hand. The source holds only these names; the parts are arguments.
    body = "".join(f"{{p{i}}}{{{field}}}" for i, field in enumerate(order)) + f"{{p{len(order)}}}"
    params = ", ".join(f"p{i}" for i in range(len(parts)))
    return eval(f"lambda {params}: lambda payload, trace, message_id, at: f'{body}'")(*parts)


def payload_envelopes(
    queue_name: str, actor_name: str, payloads: list, trace_id: str | None, max_bytes: int, ids: list[tuple[str, str]]
) -> Iterator[Chunk]:
    """Envelopes encoded a chunk at a time with no Message objects (envelope_encoder); appends each job's
    (message id, trace id) to `ids` as it is encoded."""
    encode = envelope_encoder(queue_name, actor_name)
    if trace_id is not None and json.dumps(trace_id) != f'"{trace_id}"':
        raise ValueError(f"trace id {trace_id!r} has characters JSON must escape")
    for start in range(0, len(payloads), SEND_BATCH_SIZE):
        now_ms = int(time.time() * 1000)
        chunk = payloads[start : start + SEND_BATCH_SIZE]
        message_ids = uuid4_strings(len(chunk))
        traces = [trace_id] * len(chunk) if trace_id else uuid4_strings(len(chunk))
        bodies = []
        for payload, message_id, trace in zip(chunk, message_ids, traces, strict=True):
            # the ids are uuids, or the caller's trace id checked above: JSON strings without escapes
            body = encode(payload_json(payload), f'"{trace}"', f'"{message_id}"', now_ms)
            # orjson writes UTF-8, not \u escapes: count bytes, for a body that could be over
            # (4 bytes a character at most)
            if len(body) * 4 > max_bytes and (size := len(body.encode())) > max_bytes:
                raise PayloadTooLarge(f"payload of {size} bytes exceeds FLEET_MAX_PAYLOAD_BYTES ({max_bytes})")
            bodies.append(body)
            ids.append((message_id, trace))
        yield queue_name, bodies


@contextlib.contextmanager
def _connection(broker: QueueCreator, conn: psycopg.Connection | None):
    if conn is not None:
        yield conn
    else:
        with broker.pool.connection() as pooled:
            yield pooled
