"""A job's frames as Server-Sent Events: `id:` is the frame's seq, `event:` its type, `data:` the frame.

While nothing comes, a `: keepalive` comment every GATEWAY_KEEPALIVE_S; after each quiet spell a chat
stream checks the stored answer (and the dead letters), because the stored message is the truth: a
job that ended while no one in this process listened ends the stream from there.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterator, Awaitable, Callable

from fleet.gateway.hub import Hub
from fleet.gateway.metrics import gateway_metrics

KEEPALIVE = b": keepalive\n\n"
Ended = Callable[[str], Awaitable[list[dict] | None]]


def encode(frame: dict) -> bytes:
    head = f"id: {frame['seq']}\n" if frame.get("seq") is not None else ""
    return f"{head}event: {frame['type']}\ndata: {json.dumps(frame, separators=(',', ':'))}\n\n".encode()


def _after(frames: list[dict], last_seq: int | None) -> list[dict]:
    if last_seq is None:
        return frames
    return [f for f in frames if f.get("seq") is not None and f["seq"] > last_seq]


async def job_stream(hub: Hub, job_id: str, followed: tuple[asyncio.Queue, list[dict]], *, last_seq: int | None,
                     ended: Ended | None, check_first: bool, keepalive_s: float,
                     timeout_s: float) -> AsyncIterator[bytes]:
    """The frames after `last_seq` until the job's final frame (or the stream timeout). `followed` is
    what hub.follow(job_id) returned (called before the job was enqueued); `check_first` looks for a
    stored answer before waiting (on pgmq, where frames already sent are not heard again)."""
    queue, backlog = followed
    gauge = gateway_metrics().open_streams.labels(hub.kind)
    gauge.inc()
    try:
        if check_first and not backlog and ended is not None and (stored := await ended(job_id)) is not None:
            for frame in stored[-1:] if last_seq is not None else stored:  # after a resume only the final frame
                yield encode(frame)
            return
        heard = bool(backlog)
        for frame in _after(backlog, last_seq):
            yield encode(frame)
            if frame["type"] in hub.finals:
                return
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                frame = await asyncio.wait_for(queue.get(), keepalive_s)
            except asyncio.TimeoutError:
                if time.monotonic() > deadline:
                    yield encode({"type": "error", "job_id": job_id, "error_class": "StreamTimeout",
                                  "message": f"no end within {timeout_s:.0f}s; the job goes on, its answer is stored"})
                    return
                yield KEEPALIVE
                if ended is not None and (stored := await ended(job_id)) is not None:
                    yield encode(stored[-1]) if heard or last_seq is not None else b"".join(map(encode, stored))
                    return
                continue
            heard = True
            if last_seq is not None and (frame.get("seq") or 0) <= last_seq:
                continue
            yield encode(frame)
            if frame["type"] in hub.finals:
                return
    finally:
        gauge.dec()
        hub.leave(job_id, queue)
