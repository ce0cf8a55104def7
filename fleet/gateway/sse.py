"""A job's frames as Server-Sent Events: `id:` is the frame's seq, `event:` its type, `data:` the frame.

While nothing comes, a `: keepalive` comment every GATEWAY_KEEPALIVE_S; after each quiet spell a chat
stream checks the stored answer (and the dead letters), because the stored message is the truth: a
job that ended while no one in this process listened ends the stream from there. The quiet streams of
a process check together, in one batch per spell (Gateway.ended_checks).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable

import structlog

from fleet.gateway.hub import Hub
from fleet.gateway.metrics import gateway_metrics
from fleet.shared.frames import to_send

log = structlog.get_logger(__name__)

KEEPALIVE = b": keepalive\n\n"
CATCH_UP_S = 5.0
Ended = Callable[..., Awaitable[list[dict] | None]]  # (job_id, *, at_once=False)


def encode(frame: dict) -> bytes:
    head = f"id: {frame['seq']}\n" if frame.get("seq") is not None else ""
    return f"{head}event: {frame['type']}\ndata: {json.dumps(frame, separators=(',', ':'))}\n\n".encode()


def _after(frames: list[dict], last_seq: int | None) -> list[dict]:
    if last_seq is None:
        return frames
    return [f for f in frames if f.get("seq") is not None and f["seq"] > last_seq]


def numbered(frames: list[dict], after: int) -> list[dict]:
    """A stored answer's frames (rebuilt from the database, so without seq) numbered on after the last frame
    the client has, so SSE ids keep increasing when the live final frame is overtaken by the stored one."""
    return [f if f.get("seq") is not None else f | {"seq": after + i} for i, f in enumerate(frames, 1)]


async def job_stream(
    hub: Hub,
    job_id: str,
    followed: tuple[asyncio.Queue, list[dict]],
    *,
    last_seq: int | None,
    ended: Ended | None,
    check_first: bool,
    keepalive_s: float,
    timeout_s: float,
) -> AsyncGenerator[bytes, None]:
    """The frames after `last_seq` until the job's final frame (or the stream timeout). `followed` is
    what hub.follow(job_id) returned (called before the job was enqueued); `check_first` looks for a
    stored answer before waiting (on pgmq, where frames already sent are not heard again)."""
    queue, backlog = followed
    gauge = gateway_metrics().open_streams.labels(hub.kind)
    gauge.inc()
    sent = last_seq or 0  # the last seq the client has: a stored answer's frames are numbered on from it
    try:
        if (
            check_first
            and not backlog
            and ended is not None
            and (stored := await ended(job_id, at_once=True)) is not None
        ):
            yield b"".join(map(encode, numbered(to_send(stored, has_the_rest=last_seq is not None), sent)))
            return  # after a resume only the final frame
        heard = bool(backlog)
        for frame in _after(backlog, last_seq):
            yield encode(frame)
            sent = frame.get("seq") or sent
            if frame["type"] in hub.finals:
                return
        deadline = time.monotonic() + timeout_s
        stored = None  # once the answer is found stored: the frames already heard go out before its final
        while True:
            try:
                frame = queue.get_nowait() if stored is not None else await asyncio.wait_for(queue.get(), keepalive_s)
            except (TimeoutError, asyncio.QueueEmpty):
                if stored is not None:
                    yield b"".join(
                        map(encode, numbered(to_send(stored, has_the_rest=heard or last_seq is not None), sent))
                    )
                    return
                if time.monotonic() > deadline:
                    yield encode(
                        {
                            "type": "error",
                            "job_id": job_id,
                            "error_class": "StreamTimeout",
                            "message": f"no end within {timeout_s:.0f}s; the job goes on, its answer is stored",
                        }
                    )
                    return
                yield KEEPALIVE
                if ended is not None and (stored := await ended(job_id)) is not None:
                    # The answer is stored after its deltas are published: the transport catches up to now,
                    # and what it heard is streamed before the stored final frame (unless a final was heard).
                    await _caught_up(hub, job_id)
                continue
            heard = True
            if last_seq is not None and (frame.get("seq") or 0) <= last_seq:
                continue
            yield encode(frame)
            sent = frame.get("seq") or sent
            if frame["type"] in hub.finals:
                return
    finally:
        gauge.dec()
        hub.leave(job_id, queue)


async def _caught_up(hub: Hub, job_id: str) -> None:
    """The transport's catch-up, bounded: a listener that is reconnecting cannot answer, and the stored
    answer is complete without the live frames."""
    try:
        await asyncio.wait_for(hub.catch_up(job_id), CATCH_UP_S)
    except TimeoutError:
        log.warning("gateway.catch_up_timeout", job_id=job_id, timeout_s=CATCH_UP_S)
