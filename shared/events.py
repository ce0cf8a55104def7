"""The append-only `bus_events` log: every step of a job's life, with its trace id.

Writes are buffered as JSON rows and inserted by a background thread every 50 ms; a pgmq
consumer also takes them into its ack round trip, so a job's events commit together with its
acknowledgement.
"""

from __future__ import annotations

import atexit
import json
import threading
import time
import uuid
from typing import Any

import psycopg
import structlog

from .db import get_pool
from .redact import redact_value

log = structlog.get_logger(__name__)

FLUSH_INTERVAL_S = 0.05
INSERT_ROWS = (
    "insert into bus_events (trace_id, job_id, queue, actor, type, payload)"
    " select (e->>0)::uuid, e->>1, e->>2, e->>3, e->>4, e->5 from jsonb_array_elements(%s::jsonb) e"
)


def as_uuid(value: Any) -> uuid.UUID | None:
    if value is None:
        return None
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


class EventWriter:
    def __init__(self) -> None:
        self._buffer: list[str] = []
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = None

    def emit(self, type: str, *, trace_id: Any = None, job_id: str | None = None, queue: str | None = None,
             actor: str | None = None, **payload: Any) -> None:
        trace = as_uuid(trace_id)
        row = json.dumps([str(trace) if trace else None, job_id, queue, actor, type, redact_value(payload)], default=str)
        with self._lock:
            self._buffer.append(row)
        self._ensure_thread()

    def _ensure_thread(self) -> None:
        import os

        if self._thread is None or self._pid != os.getpid():
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="bus-events", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(FLUSH_INTERVAL_S)
            try:
                self.flush()
            except Exception as e:  # keep the rows; try again next tick
                log.warning("events.flush_failed", error=str(e))
                time.sleep(0.5)

    def take(self) -> list[str]:
        """Hand the buffered rows to a caller that inserts them in its own statement (see as_json_array)."""
        with self._lock:
            rows, self._buffer = self._buffer, []
        return rows

    def put_back(self, rows: list[str]) -> None:
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
            except psycopg.Error:
                self.put_back(rows)
                raise
            return len(rows)


def as_json_array(rows: list[str]) -> str:
    return "[" + ",".join(rows) + "]"


_writer = EventWriter()


def emit(type: str, **fields: Any) -> None:
    _writer.emit(type, **fields)


def flush() -> int:
    return _writer.flush()


def take() -> list[str]:
    return _writer.take()


def put_back(rows: list[str]) -> None:
    _writer.put_back(rows)


def flush_quietly() -> None:
    try:
        _writer.flush()
    except Exception as e:
        log.warning("events.flush_failed", error=str(e))


atexit.register(flush_quietly)
