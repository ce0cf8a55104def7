"""One listener per gateway process for every job it streams, fanned out to per-stream queues.

A stream `follow`s a job: it gets the frames this process already holds for the job (its backlog)
and an asyncio queue for the rest. The transport (one LISTEN connection on pgmq, one XREAD loop on
Redis) is the subclass's; a job's frames are kept for GATEWAY_KEEP_FRAMES_S after its end, so a
client that reconnects to this process resumes exactly from its Last-Event-ID.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from dataclasses import dataclass, field

import structlog

from fleet.shared.frames import FINAL

log = structlog.get_logger(__name__)

MAX_FRAMES_PER_JOB = 20_000


@dataclass
class JobFeed:
    frames: list[dict] = field(default_factory=list)
    # Weak: a stream whose generator never started (its client left before the first byte) cannot
    # run its cleanup; its queue goes with it instead of pinning the job here.
    queues: weakref.WeakSet = field(default_factory=weakref.WeakSet)
    ended_at: float | None = None
    touched: float = field(default_factory=time.monotonic)


class Hub:
    kind = "base"
    finals: tuple[str, ...] = FINAL  # the frame types that end a job's stream

    def __init__(self, keep_frames_s: float, idle_drop_s: float) -> None:
        self.keep_frames_s, self.idle_drop_s = keep_frames_s, idle_drop_s
        self.feeds: dict[str, JobFeed] = {}
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._janitor(), name="hub-janitor"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def follow(self, job_id: str) -> tuple[asyncio.Queue, list[dict]]:
        """Subscribe a stream; when this returns the transport hears the job's next frame."""
        feed = self.feeds.get(job_id)
        if feed is None:
            feed = self.feeds[job_id] = JobFeed()
            try:
                await self._watch(job_id)
            except BaseException:
                self.feeds.pop(job_id, None)
                raise
        queue: asyncio.Queue = asyncio.Queue()
        feed.queues.add(queue)
        feed.touched = time.monotonic()
        return queue, list(feed.frames)

    def leave(self, job_id: str, queue: asyncio.Queue) -> None:
        if (feed := self.feeds.get(job_id)) is not None:
            feed.queues.discard(queue)
            feed.touched = time.monotonic()

    def deliver(self, job_id: str, frame: dict) -> None:
        feed = self.feeds.get(job_id)
        if feed is None:
            return
        if len(feed.frames) < MAX_FRAMES_PER_JOB:
            feed.frames.append(frame)
        feed.touched = time.monotonic()
        if frame.get("type") in self.finals:
            feed.ended_at = time.monotonic()
        for queue in list(feed.queues):
            queue.put_nowait(frame)

    def stopped_tasks(self) -> list[str]:
        return [t.get_name() for t in self._tasks if t.done()]

    def open_streams(self) -> int:
        return sum(len(f.queues) for f in self.feeds.values())

    async def _janitor(self) -> None:
        """Forget jobs nobody follows: ended ones after keep_frames_s, silent ones after idle_drop_s."""
        while True:
            await asyncio.sleep(min(5.0, max(self.keep_frames_s, 0.5)))
            now = time.monotonic()
            for job_id, feed in list(self.feeds.items()):
                if feed.queues:
                    continue
                ended = feed.ended_at is not None and now - feed.ended_at >= self.keep_frames_s
                if ended or now - feed.touched >= self.idle_drop_s:
                    del self.feeds[job_id]
                    await self._unwatch(job_id)

    async def catch_up(self, job_id: str) -> None:
        """Return once every frame the job published before this call has been delivered: a stream that
        finds the job's answer stored then streams the frames heard live before the stored final one.
        A transport that delivers as it reads (the embed poller) has nothing to catch up."""

    async def _watch(self, job_id: str) -> None:
        raise NotImplementedError

    async def _unwatch(self, job_id: str) -> None:
        raise NotImplementedError
