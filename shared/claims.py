"""Claims on `request_dedup`, the table's one owner: a claim holds a (scope, key) with a JSON record until it
expires. Every statement on the table is here; callers pass their own connection (the gateway's are async).

The scopes, and who may take over a live claim:
- IDEMPOTENCY (`enqueue`): an idempotency key of FleetClient.enqueue, recording the job it enqueued. Pending
  while the send is in flight (on Redis, where the send is not in the claim's transaction), then confirmed.
  Taken over only once it has expired.
- `gateway.<kind>` (gateway_scope): an idempotency key of a gateway request (chat, embed, agents, upgrades),
  recording the job or run it started; pending until that is enqueued, as above.
- `lease:<job type>` (lease_scope) and CREATE_AGENT: an exclusive lease held by one job id; its holder (a
  redelivery keeps the job's id) takes it back at once, anyone once it has expired.
- ATTEMPT: one retry attempt of a job (`<job id>:<retries>.<deferrals>`), held by the broker delivery that
  started it; only a redelivery of that same copy takes it back.
- ENVELOPE: a signed envelope's signature, `running` then `done` (fleet.shared.middleware.signing says when a
  running claim may be taken over).

Expired rows are deleted by housekeeping (fleet.workers.housekeeping).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

IDEMPOTENCY = "enqueue"
ATTEMPT = "attempt"
ENVELOPE = "envelope"
CREATE_AGENT = "create_agent"


def gateway_scope(kind: str) -> str:
    return f"gateway.{kind}"


def lease_scope(job_type: str) -> str:
    return f"lease:{job_type}"


# Idempotency keys. A key repeated within one call is claimed once, with its first record.
_CLAIM_KEYS = (
    "insert into request_dedup as d (scope, key, result, expires_at)"
    " select distinct on (k) %s, k, r, now() + %s * interval '1 second'"
    " from unnest(%s::text[], %s::jsonb[]) with ordinality as t(k, r, n) order by k, n"
    " on conflict (scope, key) do update set result = excluded.result, expires_at = excluded.expires_at,"
    " created_at = now() where d.expires_at < now() returning key, result"
)
_RECORDS = "select key, result from request_dedup where scope = %s and key = any(%s)"
_CONFIRM = (
    "update request_dedup set result = result - 'pending', expires_at = now() + %s * interval '1 second'"
    " where scope = %s and key = any(%s)"
)
_RELEASE_PENDING = "delete from request_dedup where scope = %s and key = any(%s) and result ? 'pending'"

# Exclusive claims held by one holder (`field` of the record names it).
_CLAIM_HELD = (
    "insert into request_dedup as d (scope, key, result, expires_at) values (%s, %s, %s,"
    " now() + %s * interval '1 second') on conflict (scope, key) do update set result = excluded.result,"
    " expires_at = excluded.expires_at, created_at = now()"
    " where d.expires_at < now() or d.result->>%s = excluded.result->>%s returning 1"
)
_RENEW = (
    "update request_dedup set expires_at = now() + %s * interval '1 second'"
    " where scope = %s and key = %s and result->>%s = %s"
)
_RELEASE_HELD = "delete from request_dedup where scope = %s and key = %s and result->>%s = %s"

# Signed envelopes.
_CLAIM_ENVELOPE = (
    "insert into request_dedup as d (scope, key, result, expires_at) values (%s, %s, %s, %s)"
    " on conflict (scope, key) do update set result = excluded.result, created_at = now()"
    " where d.result->>'state' = 'running' and ((excluded.result->>'delivery') = (d.result->>'delivery')"
    "  or d.created_at < now() - %s * interval '1 millisecond') returning 1"
)
_ENVELOPE_STATE = "select result->>'state', result->>'holder' from request_dedup where scope = %s and key = %s"
_TAKE_OVER_ENVELOPE = (
    "update request_dedup set result = %s, created_at = now() where scope = %s"
    " and key = %s and result->>'state' = 'running' and result->>'holder' = %s returning 1"
)
_ENVELOPE_DONE = (
    "update request_dedup set result = jsonb_set(result, '{state}', '\"done\"') where scope = %s and key = %s"
)

Records = dict[str, dict[str, Any]]


def claim_keys(
    conn: psycopg.Connection[Any], scope: str, keys: Sequence[str], records: Sequence[dict[str, Any]], ttl_s: float
) -> tuple[set[str], Records]:
    """Claim each key that is free (or expired) with its record: (the keys claimed now, every key's record)."""
    claimed = dict(conn.execute(_CLAIM_KEYS, (scope, ttl_s, list(keys), [Jsonb(r) for r in records])).fetchall())
    rest = [k for k in set(keys) if k not in claimed]
    seen = dict(conn.execute(_RECORDS, (scope, rest)).fetchall()) if rest else {}
    return set(claimed), claimed | seen


async def claim_keys_async(
    conn: psycopg.AsyncConnection[Any], scope: str, keys: Sequence[str], records: Sequence[dict[str, Any]], ttl_s: float
) -> tuple[set[str], Records]:
    """claim_keys on an async connection."""
    cur = await conn.execute(_CLAIM_KEYS, (scope, ttl_s, list(keys), [Jsonb(r) for r in records]))
    claimed = dict(await cur.fetchall())
    rest = [k for k in set(keys) if k not in claimed]
    seen = dict(await (await conn.execute(_RECORDS, (scope, rest))).fetchall()) if rest else {}
    return set(claimed), claimed | seen


def confirm_keys(conn: psycopg.Connection[Any], scope: str, keys: Sequence[str], ttl_s: float) -> None:
    """The keys' jobs are enqueued: each key now holds its job for ttl_s."""
    conn.execute(_CONFIRM, (ttl_s, scope, list(keys)))


async def confirm_keys_async(conn: psycopg.AsyncConnection[Any], scope: str, keys: Sequence[str], ttl_s: float) -> None:
    await conn.execute(_CONFIRM, (ttl_s, scope, list(keys)))


def release_pending(conn: psycopg.Connection[Any], scope: str, keys: Sequence[str]) -> None:
    """The keys' jobs could not be enqueued: they are free again (a confirmed key is never released)."""
    conn.execute(_RELEASE_PENDING, (scope, list(keys)))


async def release_pending_async(conn: psycopg.AsyncConnection[Any], scope: str, keys: Sequence[str]) -> None:
    await conn.execute(_RELEASE_PENDING, (scope, list(keys)))


def claim_held(
    conn: psycopg.Connection[Any], scope: str, key: str, holder: str, ttl_s: float, *, field: str = "job_id"
) -> bool:
    """Claim (scope, key) for `holder` (the record's `field`) for ttl_s: True when it is free, expired, or
    already the holder's."""
    record = Jsonb({field: holder})
    return conn.execute(_CLAIM_HELD, (scope, key, record, ttl_s, field, field)).fetchone() is not None


def renew(conn: psycopg.Connection[Any], scope: str, key: str, holder: str, ttl_s: float) -> None:
    """The holder keeps its claim for another ttl_s (no effect once another holder has it)."""
    conn.execute(_RENEW, (ttl_s, scope, key, "job_id", holder))


def release_held(conn: psycopg.Connection[Any], scope: str, key: str, holder: str) -> None:
    """Give the claim up if it is still the holder's."""
    conn.execute(_RELEASE_HELD, (scope, key, "job_id", holder))


def claim_envelope(
    conn: psycopg.Connection[Any], sig: str, record: dict[str, Any], expires_at: datetime, time_limit_ms: int
) -> bool:
    """Claim a signature as `running`: True when it is new, when the claim is the same pgmq delivery's, or
    when the running claim is older than the job's time limit."""
    params = (ENVELOPE, sig, Jsonb(record), expires_at, time_limit_ms)
    return conn.execute(_CLAIM_ENVELOPE, params).fetchone() is not None


def envelope_state(conn: psycopg.Connection[Any], sig: str) -> tuple[str | None, str | None]:
    """(state, holder) of a signature's claim, (None, None) without one."""
    return conn.execute(_ENVELOPE_STATE, (ENVELOPE, sig)).fetchone() or (None, None)


def take_over_envelope(conn: psycopg.Connection[Any], sig: str, record: dict[str, Any], old_holder: str) -> bool:
    """Take a running claim over from `old_holder` (a dead Redis worker): True when it still held it."""
    return conn.execute(_TAKE_OVER_ENVELOPE, (Jsonb(record), ENVELOPE, sig, old_holder)).fetchone() is not None


def envelope_done(conn: psycopg.Connection[Any], sig: str) -> None:
    conn.execute(_ENVELOPE_DONE, (ENVELOPE, sig))
