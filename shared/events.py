"""The append-only `bus_events` log: every step of a job's life, with its trace id.

Writes are buffered as JSON rows and inserted by a background thread every 50 ms; when its connection is
lost, the rows are put back and the insert is tried again at once, then with backoff (fleet.shared.reconnect).
In a pgmq worker process the consumers write them instead: each queue's consumer takes that queue's rows
into its ack round trip, so a job's events commit in the same transaction as its acknowledgement or an earlier
one, never a later one (a worker killed in between would leave a job acked without its outcome).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import threading
import time
import uuid
from typing import Any

import structlog

from fleet.shared.db import get_pool
from fleet.shared.payloads import storable
from fleet.shared.reconnect import DB_CONNECTION_LOST, Reconnects
from fleet.shared.redact import redact, redact_value

log = structlog.get_logger(__name__)

FLUSH_INTERVAL_S = 0.05
REFUSED_BACKOFF_S = 0.5  # an insert the database refuses (not a lost connection) is tried again this often
# The one definition of the insert is in SQL (fleet_insert_events), shared with the pgmq consumer's ack.
INSERT_ROWS = "select fleet_insert_events(%s::jsonb)"


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def as_uuid(value: Any) -> str | None:
    """The canonical text of a UUID, or None when `value` is not one."""
    if value is None:
        return None
    if isinstance(value, str) and _CANONICAL_UUID.fullmatch(value):
        return value  # what the fleet's own trace ids look like: no need to parse them
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        return None


Row = tuple  # (queue or None, the row's JSON text)
# One encoder for every row: json.dumps(..., default=str) would build a new JSONEncoder on each call.
_encode = json.JSONEncoder(default=str).encode


def encode_json(value: Any) -> str:
    """A value as JSON text a jsonb column accepts (see storable)."""
    return storable(_encode(value))


class EventWriter:
    def __init__(self) -> None:
        self._buffer: list[Row] = []
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self.background = True  # off in pgmq worker processes: the consumers write the rows
        self.claimed: set[str] = set()  # queues whose consumer in this process takes their rows
        self.reconnects = Reconnects("events")

    def emit(
        self,
        type: str,
        *,
        trace_id: Any = None,
        job_id: str | None = None,
        queue: str | None = None,
        actor: str | None = None,
        **payload: Any,
    ) -> None:
        row = encode_json([as_uuid(trace_id), job_id, queue, actor, type, redact_value(payload)])
        self.append(queue, row)

    def append(self, queue: str | None, row: str) -> None:
        with self._lock:
            self._buffer.append((queue, row))
        self._ensure_thread()

    def _ensure_thread(self) -> None:
        if self.background and (self._thread is None or self._pid != os.getpid() or not self._thread.is_alive()):
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="bus-events", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        wait = FLUSH_INTERVAL_S
        while self.background:
            time.sleep(wait)
            wait = FLUSH_INTERVAL_S
            try:  # a failed flush has put its rows back: they go in the next try
                if self.flush():
                    self.reconnects.restored()
            except DB_CONNECTION_LOST as e:  # the pool replaces a broken connection: at once, then with backoff
                wait = self.reconnects.lost(e)
            except Exception as e:  # noqa: BLE001  logged, and the rows kept for the next flush
                log.warning("events.flush_failed", error_class=type(e).__name__, error=redact(str(e)))
                wait = REFUSED_BACKOFF_S

    def take(self, queue: str | None = None) -> list[Row]:
        """Hand buffered rows to a caller that inserts them in its own statement (see as_json_array):
        all of them, or one queue's consumer's share: that queue's rows and those no consumer claims."""
        with self._lock:
            if queue is None:
                rows, self._buffer = self._buffer, []
            else:
                mine = [r[0] == queue or r[0] not in self.claimed for r in self._buffer]
                rows = [r for r, m in zip(self._buffer, mine, strict=True) if m]
                self._buffer = [r for r, m in zip(self._buffer, mine, strict=True) if not m]
        return rows

    def put_back(self, rows: list[Row]) -> None:
        with self._lock:
            self._buffer[:0] = rows

    def flush(self) -> int:
        with self._flush_lock:
            rows = self.take()
            if not rows:
                return 0
            try:
                with get_pool().connection() as conn:
                    conn.execute(INSERT_ROWS, (as_json_array(rows),))
            except BaseException:
                self.put_back(rows)
                raise
            return len(rows)


def as_json_array(rows: list[Row]) -> str:
    return "[" + ",".join(row for _, row in rows) + "]"


_writer = EventWriter()


def emit(type: str, **fields: Any) -> None:
    _writer.emit(type, **fields)


def job_head(trace_id: Any, job_id: str | None, queue: str | None, actor: str | None) -> str:
    """The first four columns of a job's rows as JSON text (an open array), encoded once per job and shared
    by each of its events (see emit_for)."""
    return encode_json([as_uuid(trace_id), job_id, queue, actor])[:-1]


def emit_for(head: str, queue: str | None, type: str, **payload: Any) -> None:
    """emit() for a job whose head is already encoded: the row is its head, the type and the payload."""
    _writer.append(queue, f"{head},{_encode(type)},{encode_json(redact_value(payload))}]")


def emit_encoded(head: str, queue: str | None, type_json: str, payload_json: str) -> None:
    """emit_for() for the fleet's own job-life rows, whose type and payload the caller has written as JSON
    text: payloads of numbers and ids the fleet made itself, with no secret to redact and no NUL."""
    _writer.append(queue, f"{head},{type_json},{payload_json}]")


def flush() -> int:
    return _writer.flush()


def take(queue: str | None = None) -> list[Row]:
    return _writer.take(queue)


def put_back(rows: list[Row]) -> None:
    _writer.put_back(rows)


def written_with_acks(queue: str) -> None:
    """A pgmq consumer of `queue` in this process writes that queue's events with its acks (and the
    background writer stops: the consumers write everything)."""
    with _writer._lock:
        _writer.claimed.add(queue)
        _writer.background = False


def not_written_with_acks(queue: str) -> None:
    """The pgmq consumer of `queue` in this process has closed: that queue's rows go back to the background
    writer, and every row does once no consumer is left (a process that goes on, as a test or a restarting
    consumer thread, still writes its events; rows written early are safe, only later than an ack is not)."""
    with _writer._lock:
        _writer.claimed.discard(queue)
        if not _writer.claimed:
            _writer.background = True
    _writer._ensure_thread()


def written_by_ack_writer() -> None:
    """A Redis worker process: its ack writer writes every row before the acks of their jobs (and the
    background writer stops, so no row is in flight outside that writer's commit)."""
    with _writer._lock:
        _writer.background = False


def written_in_background() -> None:
    """The ack writer has stopped (its broker closed): rows emitted from now on go back to the background
    writer, so a process that goes on after closing its Redis broker still writes its events."""
    with _writer._lock:
        _writer.background = True
    _writer._ensure_thread()


def flush_quietly() -> None:
    try:
        _writer.flush()
    except Exception as e:  # noqa: BLE001  logged: at exit there is no one left to raise to
        log.warning("events.flush_failed", error=str(e))


atexit.register(flush_quietly)
