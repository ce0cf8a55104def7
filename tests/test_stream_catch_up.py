"""A chat stream that finds the job's answer stored after a quiet spell first streams the frames the job
published before it (heard live, once the transport has caught up), then the stored final frame: a retried
attempt that runs to its end inside one keepalive interval is still streamed delta by delta."""

from __future__ import annotations

import asyncio
import uuid

from fleet.shared.config import Settings


async def _stream(hub, job_id: str, publish) -> list[dict]:
    import json

    from fleet.gateway.sse import job_stream

    followed = await hub.follow(job_id)
    publish()  # the attempt's frames; then its answer is stored (what `ended` returns)

    async def ended(_: str) -> list[dict]:
        return [
            {"type": "ready", "job_id": job_id, "replayed": True},
            {"type": "chat.delta", "job_id": job_id, "text": "one two three"},
            {"type": "chat.done", "job_id": job_id, "text": "one two three", "status": "complete"},
        ]

    out = b""
    async for chunk in job_stream(
        hub, job_id, followed, last_seq=None, ended=ended, check_first=False, keepalive_s=0.05, timeout_s=60
    ):
        out += chunk
    return [json.loads(line[6:]) for line in out.decode().splitlines() if line.startswith("data: ")]


def _publisher(job_id: str, broker: str):
    from fleet.shared.frames import FramePublisher

    publisher = FramePublisher(job_id, Settings(FLEET_BROKER=broker))

    def publish() -> None:
        publisher.publish("ready", model="sim-chat")
        for word in ("one ", "two ", "three"):
            publisher.publish("chat.delta", text=word)
        publisher.close()

    return publish


def _assert_live_deltas_then_stored_final(frames: list[dict]) -> None:
    assert [f["type"] for f in frames] == ["ready", "chat.delta", "chat.delta", "chat.delta", "chat.done"], frames
    assert [f["seq"] for f in frames] == [1, 2, 3, 4, 5]
    assert "".join(f["text"] for f in frames[1:4]) == frames[-1]["text"]


def test_redis_stream_streams_the_deltas_published_before_the_stored_answer(services):
    """The XREAD loop is not running here, so only the catch-up can hear the frames: without it the
    stream would answer with the stored frames alone."""
    from fleet.gateway.hub_redis import RedisHub

    async def main() -> list[dict]:
        hub = RedisHub(keep_frames_s=60, idle_drop_s=60)
        try:
            job_id = f"catch-up-{uuid.uuid4()}"
            return await _stream(hub, job_id, _publisher(job_id, "redis"))
        finally:
            await hub._writer.aclose()
            await hub._reader.aclose()

    _assert_live_deltas_then_stored_final(asyncio.run(main()))


def test_pgmq_catch_up_returns_once_every_earlier_frame_is_dispatched(services):
    from fleet.gateway.hub_pg import PgHub

    async def main() -> tuple[int, list[dict]]:
        hub = PgHub(keep_frames_s=60, idle_drop_s=60)
        await hub.start()
        try:
            job_id = f"catch-up-{uuid.uuid4()}"
            queue, _ = await hub.follow(job_id)
            _publisher(job_id, "pgmq")()
            await hub.catch_up(job_id)
            held = queue.qsize()  # every NOTIFY committed before the catch-up's wake
            other = f"catch-up-{uuid.uuid4()}"
            return held, await _stream(hub, other, _publisher(other, "pgmq"))
        finally:
            await hub.stop()

    held, frames = asyncio.run(main())
    assert held == 4
    _assert_live_deltas_then_stored_final(frames)
