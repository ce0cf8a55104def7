"""The Redis transport: one XREAD loop per process over the frame streams of every followed job.

The loop also reads the process's own wake stream, which `follow` writes to, so a new job joins the
next XREAD at once. A job's stream is read from its start, so nothing is missed on Redis.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import cast

import redis.asyncio as aioredis
import structlog
from redis.typing import KeyT, StreamIdT

from fleet.gateway.hub import Hub
from fleet.shared.db import redis_url
from fleet.shared.frames import StreamReply, stream_key
from fleet.shared.reconnect import Reconnects

log = structlog.get_logger(__name__)

BLOCK_MS = 5000
WAKE_TTL_S = 3600


class RedisHub(Hub):
    kind = "redis"

    def __init__(self, keep_frames_s: float, idle_drop_s: float) -> None:
        super().__init__(keep_frames_s, idle_drop_s)
        self.wake = f"fleet:gateway:wake:{uuid.uuid4().hex}"
        self.positions: dict[str, str] = {}  # stream key -> last entry id read
        self.jobs: dict[str, str] = {}  # stream key -> job id
        self._reader = aioredis.Redis.from_url(redis_url())
        self._writer = aioredis.Redis.from_url(redis_url())
        self.reconnects = Reconnects("frames", role="gateway")

    async def start(self) -> None:
        self._wake_last = await self._writer.xadd(self.wake, {"w": "1"}, maxlen=10)
        await self._writer.expire(self.wake, WAKE_TTL_S)
        self._tasks.append(asyncio.create_task(self._read_loop(), name="hub-redis-read"))
        await super().start()

    async def stop(self) -> None:
        await super().stop()
        await self._writer.delete(self.wake)
        await self._reader.aclose()
        await self._writer.aclose()

    async def _watch(self, job_id: str) -> None:
        key = stream_key(job_id)
        self.jobs[key], self.positions[key] = job_id, "0"
        await self._writer.xadd(self.wake, {"w": "1"}, maxlen=10)

    async def _unwatch(self, job_id: str) -> None:
        key = stream_key(job_id)
        self.jobs.pop(key, None)
        self.positions.pop(key, None)

    async def _read_loop(self) -> None:
        wake_last, refreshed = self._wake_last, time.monotonic()
        while True:
            try:
                streams: dict[KeyT, StreamIdT] = {self.wake: wake_last}
                streams.update(self.positions)
                replies = cast(StreamReply, await self._reader.xread(streams, block=BLOCK_MS, count=1000))
                self.reconnects.restored()
                for raw_key, entries in replies or []:
                    key = raw_key.decode()
                    if key == self.wake:
                        wake_last = entries[-1][0]
                        continue
                    self._deliver_entries(key, entries)
                if time.monotonic() - refreshed > WAKE_TTL_S / 4:
                    await self._writer.expire(self.wake, WAKE_TTL_S)
                    refreshed = time.monotonic()
            except asyncio.CancelledError:
                raise
            except aioredis.RedisError as e:
                await asyncio.sleep(self.reconnects.lost(e))

    async def catch_up(self, job_id: str) -> None:
        """Read the job's stream to its end now, beside the XREAD loop (whose reply may then repeat
        entries: _deliver_entries skips those)."""
        key = stream_key(job_id)
        if key not in self.positions:
            return
        entries = await self._writer.xrange(key, min=f"({self.positions[key]}" if self.positions[key] != "0" else "-")
        self._deliver_entries(key, entries)

    def _deliver_entries(self, key: str, entries) -> None:
        job_id = self.jobs.get(key)
        if job_id is None:
            return
        for entry_id, fields in entries:
            entry = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            if _entry_order(entry) <= _entry_order(self.positions.get(key, "0")):
                continue  # delivered already (by catch_up, or by the loop before it)
            self.positions[key] = entry
            self.deliver(job_id, json.loads(fields[b"frame"]))


def _entry_order(entry_id: str) -> tuple[int, int]:
    """A stream entry id ("<ms>-<seq>", or "0" for the start) as the pair Redis orders entries by."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
