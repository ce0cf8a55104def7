"""The gateway's Postgres reads and writes (async, one small pool per process)."""

from __future__ import annotations

import uuid

from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from fleet.shared import claims
from fleet.shared.db import connect_kwargs, database_dsn, one

KEY_TTL_S = 7 * 86400
PENDING_TTL_S = 60  # a key claimed by a request that has not enqueued its job yet
JOB_STATES = {
    "job.started": "running",
    "job.retrying": "retrying",
    "job.deferred": "deferred",
    "job.succeeded": "succeeded",
    "job.dead": "dead",
    "job.skipped": "skipped",
}


class Store:
    def __init__(self, max_size: int = 10) -> None:
        self.pool = AsyncConnectionPool(
            database_dsn(), min_size=1, max_size=max_size, kwargs=connect_kwargs(), name="gateway", open=False
        )

    async def open(self) -> None:
        await self.pool.open(wait=True, timeout=30)

    async def close(self) -> None:
        await self.pool.close()

    async def ping(self) -> None:
        async with self.pool.connection() as conn:
            await conn.execute("select 1")

    async def claim_key(self, scope: str, key: str) -> tuple[str, str, str]:
        """(job_id, trace_id, state) for an idempotency key: state "new" (claimed now, as pending for
        PENDING_TTL_S: confirm it once the job is enqueued, release it if that fails), "done" (its job was
        enqueued) or "pending" (another request is enqueuing it). A pending claim that expired, left by a
        request that died before its enqueue, is claimed afresh."""
        planned = {"job_id": str(uuid.uuid4()), "trace_id": str(uuid.uuid4()), "pending": True}
        async with self.pool.connection() as conn:
            claimed, seen = await claims.claim_keys_async(conn, scope, [key], [planned], PENDING_TTL_S)
        record = seen[key]
        state = "new" if claimed else "pending" if record.get("pending") else "done"
        return record["job_id"], record["trace_id"], state

    async def confirm_key(self, scope: str, key: str) -> None:
        """The key's job is enqueued: the key now holds it for KEY_TTL_S."""
        async with self.pool.connection() as conn:
            await claims.confirm_keys_async(conn, scope, [key], KEY_TTL_S)

    async def release_key(self, scope: str, key: str) -> None:
        """The key's job could not be enqueued: the key is free again (a confirmed key is never released)."""
        async with self.pool.connection() as conn:
            await claims.release_pending_async(conn, scope, [key])

    async def record_job(
        self, job_id: str, trace_id: str, kind: str, user_id: str | None, session_id: str | None
    ) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(
                "insert into gateway_jobs (job_id, trace_id, kind, user_id, session_id) values (%s, %s, %s, %s, %s)"
                " on conflict (job_id) do nothing",
                (job_id, trace_id, kind, user_id, session_id),
            )

    async def forget_job(self, job_id: str) -> None:
        """A job that could not be enqueued: no owner row for a job that does not exist."""
        async with self.pool.connection() as conn:
            await conn.execute("delete from gateway_jobs where job_id = %s", (job_id,))

    async def claim_session(self, session_id: str, user_id: str | None) -> str | None:
        """Creates the session for this user if it is new; returns its owner."""
        async with self.pool.connection() as conn:
            await conn.execute(
                "insert into chat_sessions (id, user_id) values (%s, %s) on conflict (id) do nothing",
                (session_id, user_id),
            )
            cur = await conn.execute("select user_id from chat_sessions where id = %s", (session_id,))
            owner = one(await cur.fetchone())[0]
        return str(owner) if owner is not None else None

    async def job(self, job_id: str) -> dict | None:
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                "select job_id, trace_id, kind, user_id, session_id, created_at from gateway_jobs where job_id = %s",
                (job_id,),
            )
            return await cur.fetchone()

    async def trace_owned_by(self, trace_id: str, user_id: str) -> bool:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "select 1 from gateway_jobs where trace_id = %s and user_id = %s limit 1", (trace_id, user_id)
            )
            return await cur.fetchone() is not None

    async def events(
        self,
        *,
        job_id: str | None = None,
        trace_id: str | None = None,
        job_ids: list[str] | None = None,
        limit: int = 1000,
    ) -> list[dict]:
        where, arg = (
            ("job_id = %s", job_id)
            if job_id is not None
            else ("trace_id = %s", trace_id)
            if trace_id is not None
            else ("job_id = any(%s)", job_ids)
        )
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"select id, created_at, type, queue, actor, job_id, trace_id, payload from bus_events"
                f" where {where} order by id limit %s",
                (arg, limit),
            )
            return await cur.fetchall()

    async def dead_letter(self, job_id: str) -> dict | None:
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                "select reason, error_class, attempts, created_at from dead_letters"
                " where message_id = %s order by id desc limit 1",
                (job_id,),
            )
            return await cur.fetchone()

    async def remember_signature(self, signature: str, ttl_s: int) -> bool:
        """False when the signature was seen before (within its window): a replay."""
        # Expired rows are pruned by housekeeping; one not pruned yet is taken over here, not scanned for.
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "insert into gateway_signatures as g (signature, expires_at)"
                " values (%s, now() + %s * interval '1 second')"
                " on conflict (signature) do update set expires_at = excluded.expires_at where g.expires_at < now()"
                " returning 1",
                (signature, ttl_s),
            )
            return await cur.fetchone() is not None


def job_state(events: list[dict]) -> tuple[str, int]:
    """(state, attempts) from a job's bus_events."""
    state, attempts = "queued", 0
    for e in events:
        if e["type"] == "job.started":
            attempts += 1
        state = JOB_STATES.get(e["type"], state)
    return state, attempts
