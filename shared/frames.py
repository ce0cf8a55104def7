"""Frames to listeners of a streaming job: `ready`, `keepalive`, `chat.delta`, `chat.done`, `error`.

On the pgmq broker frames go through Postgres NOTIFY (a listener LISTENs before it enqueues);
on the Redis broker through a Redis stream per job, which a late listener can replay from the start.
Either way the stored message is the truth: a listener that comes after the end reads it there.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, cast

import psycopg
from psycopg import sql

from fleet.shared.capabilities import capabilities
from fleet.shared.config import Settings, get_settings
from fleet.shared.db import database_dsn, get_pool, redis_url

NOTIFY_LIMIT = 7000  # Postgres refuses NOTIFY payloads of 8000 bytes and more
STREAM_TTL_S = 3600
FINAL = ("chat.done", "error")

# XREAD's answer, which redis-py types loosely: [(stream key, [(entry id, {field: value})])]
StreamReply = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]

if TYPE_CHECKING:
    import redis


def channel(job_id: str) -> str:
    return "fleet_chat_" + hashlib.sha1(job_id.encode()).hexdigest()


def stream_key(job_id: str) -> str:
    """The Redis stream that holds a job's frames (on the Redis broker)."""
    return f"fleet:frames:{job_id}"


class FramePublisher:
    """Publishes a job's frames in order (seq 1, 2, ...); safe to share between the job's threads."""

    def __init__(self, job_id: str, settings: Settings | None = None, *, after_seq: int = 0) -> None:
        self.job_id = job_id
        self.settings = settings or get_settings()
        self.seq = after_seq  # a retried job's next attempt goes on after the last attempt's frames
        self.sent: set[str] = set()  # the frame types published so far
        self.lock = threading.Lock()
        self._redis: redis.Redis | None = None

    def publish(self, type_: str, **fields) -> None:
        with self.lock:
            self.seq += 1
            self.sent.add(type_)
            frame = {"seq": self.seq, "type": type_, "job_id": self.job_id, "t": time.time()} | fields
            if capabilities(self.settings).frames == "stream":
                self._publish_redis(frame)
            else:
                self._publish_pg(frame)

    def _publish_pg(self, frame: dict) -> None:
        payload = json.dumps(frame)
        if len(payload.encode()) > NOTIFY_LIMIT:  # the listener reads the text from the stored message
            payload = json.dumps({k: v for k, v in frame.items() if k != "text"} | {"stored": True})
        with get_pool().connection() as conn, conn.transaction():
            # frames are ephemeral (the stored message is the truth): no need to wait for a WAL flush
            conn.execute("set local synchronous_commit = off")
            conn.execute("select pg_notify(%s, %s)", (channel(self.job_id), payload))

    def _publish_redis(self, frame: dict) -> None:
        import redis

        if self._redis is None:
            self._redis = redis.Redis.from_url(redis_url(self.settings))
        key = stream_key(self.job_id)
        pipe = self._redis.pipeline()
        pipe.xadd(key, {"frame": json.dumps(frame)}, maxlen=100_000, approximate=True)
        pipe.expire(key, STREAM_TTL_S)
        pipe.execute()

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()


class FrameListener:
    """Follows one job's frames. For NOTIFY, open it (LISTEN) before the job is enqueued."""

    def __init__(self, job_id: str, settings: Settings | None = None) -> None:
        self.job_id = job_id
        self.settings = settings or get_settings()
        self._conn: psycopg.Connection | None = None
        if capabilities(self.settings).frames == "notify":
            self._conn = psycopg.connect(database_dsn(self.settings), autocommit=True)
            self._conn.execute(sql.SQL("listen {}").format(sql.Identifier(channel(job_id))))

    def frames(self, timeout: float = 300) -> Iterator[dict]:
        """Frames until chat.done or error; from the stored message if the job already ended."""
        try:
            if capabilities(self.settings).frames == "stream":
                yield from self._redis_frames(timeout)
            else:
                yield from self._pg_frames(timeout)
        finally:
            self.close()

    def _pg_frames(self, timeout: float) -> Iterator[dict]:
        stored = stored_answer(self.job_id)
        if stored is not None:
            yield from stored
            return
        deadline = time.monotonic() + timeout
        heard = False
        assert self._conn is not None  # opened (LISTEN) in __init__ for NOTIFY
        while time.monotonic() < deadline:
            quiet = True
            for note in self._conn.notifies(timeout=1.0, stop_after=1):
                quiet, heard = False, True
                frame = json.loads(note.payload)
                if frame.get("stored"):
                    frame["text"] = (stored_message(self.job_id) or {}).get("content", "")
                yield frame
                if frame["type"] in FINAL:
                    return
            if quiet and (stored := stored_answer(self.job_id) or dead_frame(self.job_id)) is not None:
                # it ended while we were not listening: the stored answer (only its end if we heard the rest)
                yield from to_send(stored, has_the_rest=heard)
                return
        yield {"type": "error", "error_class": "ListenerTimeout", "message": f"no answer within {timeout:.0f}s"}

    def _redis_frames(self, timeout: float) -> Iterator[dict]:
        import redis

        client = redis.Redis.from_url(redis_url(self.settings))
        key = stream_key(self.job_id)
        last: bytes | str = "0"
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                for _, entries in cast(StreamReply, client.xread({key: last}, block=1000, count=1000)) or []:
                    for entry_id, fields in entries:
                        last = entry_id
                        frame = json.loads(fields[b"frame"])
                        yield frame
                        if frame["type"] in FINAL:
                            return
                if not client.exists(key) and (stored := stored_answer(self.job_id) or dead_frame(self.job_id)):
                    yield from stored
                    return
        finally:
            client.close()
        yield {"type": "error", "error_class": "ListenerTimeout", "message": f"no answer within {timeout:.0f}s"}

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def to_send(stored: list[dict], *, has_the_rest: bool) -> list[dict]:
    """A stored answer's frames as a listener needs them: only the final frame when it already has the rest
    (it heard live frames, or it resumes after some), else all of them. The SDK and the gateway both follow
    this rule."""
    return stored[-1:] if has_the_rest else stored


def stored_message(job_id: str, *, final_only: bool = False) -> dict | None:
    from psycopg.rows import dict_row

    with get_pool().connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            "select content, status, model, tokens_in, tokens_out, tokens_estimated, finish_reason, error"
            " from messages where job_id = %s and role = 'assistant' order by id desc limit 1",
            (job_id,),
        ).fetchone()
    if row is None or (final_only and row["status"] == "streaming"):
        return None
    return row


def stored_answer(job_id: str) -> list[dict] | None:
    """The frames a listener would have seen, rebuilt from a finished stored answer."""
    row = stored_message(job_id, final_only=True)
    return None if row is None else answer_frames(job_id, row)


def ended_frames(job_ids: list[str]) -> dict[str, list[dict]]:
    """`stored_answer(j) or dead_frame(j)` for many jobs in two queries: the jobs that have ended, each with
    the frames of its finished stored answer, else the `error` frame of its dead letter."""
    from psycopg.rows import dict_row

    with get_pool().connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            "select distinct on (job_id) job_id, content, status, model, tokens_in, tokens_out, tokens_estimated,"
            " finish_reason, error from messages where job_id = any(%s) and role = 'assistant'"
            " order by job_id, id desc",
            (job_ids,),
        ).fetchall()
        ended = {r["job_id"]: answer_frames(r["job_id"], r) for r in rows if r["status"] != "streaming"}
        rest = [j for j in job_ids if j not in ended]
        if rest:
            for row in cur.execute(
                "select distinct on (message_id) message_id, reason, error_class from dead_letters"
                " where message_id = any(%s) order by message_id, id desc",
                (rest,),
            ):
                ended[row["message_id"]] = [
                    {
                        "type": "error",
                        "job_id": row["message_id"],
                        "status": "error",
                        "error_class": row["error_class"],
                        "message": row["reason"],
                    }
                ]
    return ended


def answer_frames(job_id: str, row: dict) -> list[dict]:
    frames = [{"type": "ready", "job_id": job_id, "replayed": True}]
    if row["content"]:
        frames.append({"type": "chat.delta", "job_id": job_id, "text": row["content"]})
    usage = {
        "prompt_tokens": row["tokens_in"],
        "completion_tokens": row["tokens_out"],
        "estimated": row["tokens_estimated"],
    }
    if row["status"] == "complete":
        frames.append(
            {
                "type": "chat.done",
                "job_id": job_id,
                "text": row["content"],
                "usage": usage,
                "finish_reason": row["finish_reason"],
                "status": "complete",
            }
        )
    else:
        frames.append(
            {
                "type": "error",
                "job_id": job_id,
                "error_class": "Interrupted",
                "message": row["error"] or f"the answer is {row['status']}",
                "status": row["status"],
                "text": row["content"],
                "usage": usage,
            }
        )
    return frames


def dead_frame(job_id: str) -> list[dict] | None:
    """An `error` frame for a job that went to the dead letters without publishing one."""
    with get_pool().connection() as conn:
        row = conn.execute(
            "select reason, error_class from dead_letters where message_id = %s order by id desc limit 1", (job_id,)
        ).fetchone()
    if row is None:
        return None
    return [{"type": "error", "job_id": job_id, "error_class": row[1], "message": row[0], "status": "error"}]
