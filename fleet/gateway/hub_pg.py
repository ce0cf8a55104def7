"""The pgmq transport: one LISTEN connection per process, a channel per followed job.

LISTEN and UNLISTEN run on the listening connection between waits; a NOTIFY on the process's own
wake channel (sent from a second connection) interrupts the wait, so a new stream is listening
within one round trip and before its job is enqueued.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from contextlib import aclosing

import psycopg
import structlog
from psycopg import sql

from fleet.gateway.hub import Hub
from fleet.shared.db import connect_kwargs, database_dsn
from fleet.shared.frames import channel, stored_message
from fleet.shared.reconnect import Reconnects

log = structlog.get_logger(__name__)


class PgHub(Hub):
    kind = "pgmq"

    def __init__(self, keep_frames_s: float, idle_drop_s: float) -> None:
        super().__init__(keep_frames_s, idle_drop_s)
        self.wake = f"fleet_gateway_{uuid.uuid4().hex}"
        self.channels: dict[str, str] = {}  # channel -> job id
        self.listening: set[str] = set()
        self.pending: dict[str, asyncio.Event] = {}
        self._listener: psycopg.AsyncConnection | None = None
        self._waker: psycopg.AsyncConnection | None = None
        self._waker_lock = asyncio.Lock()
        self._catch_ups: dict[str, asyncio.Event] = {}  # wake payload -> set once the listener reads it
        self.reconnects = Reconnects("listener", role="gateway")

    async def start(self) -> None:
        self._waker = await psycopg.AsyncConnection.connect(database_dsn(), **connect_kwargs())
        self._tasks.append(asyncio.create_task(self._listen_loop(), name="hub-pg-listen"))
        await super().start()

    async def stop(self) -> None:
        await super().stop()
        for conn in (self._listener, self._waker):
            if conn is not None:
                await conn.close()

    async def _watch(self, job_id: str) -> None:
        name = channel(job_id)
        self.channels[name] = job_id
        done = self.pending.setdefault(name, asyncio.Event())
        await self._poke()
        await asyncio.wait_for(done.wait(), 30)

    async def _unwatch(self, job_id: str) -> None:
        self.channels.pop(channel(job_id), None)
        await self._poke()

    async def catch_up(self, job_id: str) -> None:
        """PostgreSQL delivers notifications in commit order: once the listener reads a wake sent now,
        it has dispatched every frame committed before it."""
        token = uuid.uuid4().hex
        read = self._catch_ups[token] = asyncio.Event()
        try:
            await self._poke(token)
            await asyncio.wait_for(read.wait(), 30)
        finally:
            self._catch_ups.pop(token, None)

    async def _poke(self, payload: str = "") -> None:
        async with self._waker_lock:
            assert self._waker is not None  # connected in start()
            try:
                await self._waker.execute("select pg_notify(%s, %s)", (self.wake, payload))
            except psycopg.OperationalError:  # the connection was lost (a database restart): once more
                await self._waker.close()
                self._waker = await psycopg.AsyncConnection.connect(database_dsn(), **connect_kwargs())
                await self._waker.execute("select pg_notify(%s, %s)", (self.wake, payload))

    async def _sync_channels(self, conn: psycopg.AsyncConnection) -> None:
        for name in set(self.channels) - self.listening:
            await conn.execute(sql.SQL("listen {}").format(sql.Identifier(name)))
            self.listening.add(name)
        for name in self.listening - set(self.channels):
            await conn.execute(sql.SQL("unlisten {}").format(sql.Identifier(name)))
            self.listening.discard(name)
        for name in [n for n in self.pending if n in self.listening or n not in self.channels]:
            self.pending.pop(name).set()

    async def _listen_loop(self) -> None:
        while True:
            try:
                await self._close_listener()  # the connection of the last round, if it failed
                conn = self._listener = await psycopg.AsyncConnection.connect(database_dsn(), **connect_kwargs())
                self.listening.clear()
                await conn.execute(sql.SQL("listen {}").format(sql.Identifier(self.wake)))
                self.reconnects.restored()
                while True:
                    await self._sync_channels(conn)
                    async with aclosing(conn.notifies(timeout=5.0)) as notes:
                        async for note in notes:
                            if note.channel == self.wake:
                                if (read := self._catch_ups.get(note.payload)) is not None:
                                    read.set()
                                break
                            await self._dispatch_logged(note.channel, note.payload)
            except asyncio.CancelledError:
                raise
            except psycopg.Error as e:  # the streams' stored-answer checks cover what was missed meanwhile
                await asyncio.sleep(self.reconnects.lost(e))
            except Exception:  # a bug here must not end every stream's listener for good: reconnect
                log.exception("gateway.listen_failed")
                await asyncio.sleep(1.0)

    async def _close_listener(self) -> None:
        if self._listener is not None and not self._listener.closed:
            try:
                await self._listener.close()
            except Exception as e:  # noqa: BLE001  logged; a broken connection may fail to close: it is dropped all the same
                log.warning("gateway.listen_close_failed", error=type(e).__name__)
        self._listener = None

    async def _dispatch_logged(self, name: str, payload: str) -> None:
        """One bad notification (a stray NOTIFY that is not a frame) is logged and skipped, not fatal."""
        try:
            await self._dispatch(name, payload)
        except (ValueError, TypeError, AttributeError):
            log.exception("gateway.bad_notification", channel=name, payload_bytes=len(payload))

    async def _dispatch(self, name: str, payload: str) -> None:
        job_id = self.channels.get(name)
        if job_id is None:
            return
        frame = json.loads(payload)
        if frame.get("stored"):  # too large for NOTIFY: the text is in the stored message
            row = await asyncio.to_thread(stored_message, job_id)
            frame["text"] = (row or {}).get("content", "")
        self.deliver(job_id, frame)
