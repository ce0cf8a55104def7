"""The append-only `bus_events` log: every step of a job's life, with its trace id.

Writes are buffered and sent with COPY by a background thread (and before a pgmq
ack batch, so a job's events are stored before the job leaves the queue).
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
COLUMNS = ("trace_id", "job_id", "queue", "actor", "type", "payload")


def as_uuid(value: Any) -> uuid.UUID | None:
    if value is None:
        return None
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


class EventWriter:
    def __init__(self) -> None:
        self._buffer: list[tuple] = []
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = None

    def emit(self, type: str, *, trace_id: Any = None, job_id: str | None = None, queue: str | None = None,
             actor: str | None = None, **payload: Any) -> None:
        row = (as_uuid(trace_id), job_id, queue, actor, type, json.dumps(redact_value(payload), default=str))
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

    def flush(self) -> int:
        with self._flush_lock:
            with self._lock:
                rows, self._buffer = self._buffer, []
            if not rows:
                return 0
            try:
                with get_pool().connection() as conn, conn.cursor() as cur:
                    with cur.copy(f"copy bus_events ({', '.join(COLUMNS)}) from stdin") as copy:
                        for row in rows:
                            copy.write_row(row)
            except psycopg.Error:
                with self._lock:
                    self._buffer[:0] = rows
                raise
            return len(rows)


_writer = EventWriter()


def emit(type: str, **fields: Any) -> None:
    _writer.emit(type, **fields)


def flush() -> int:
    return _writer.flush()


def flush_quietly() -> None:
    try:
        _writer.flush()
    except Exception as e:
        log.warning("events.flush_failed", error=str(e))


atexit.register(flush_quietly)
