"""Rate limits that hold across every process and machine: dramatiq's rate limiters
(`dramatiq.rate_limits`) on Redis when the fleet has Redis, and on Postgres otherwise, through
`PostgresBackend`, an implementation of dramatiq's RateLimiterBackend interface.

A job that meets a limit raises dramatiq's RateLimitExceeded, which the retry middleware treats as
"deferred": the job is put back with a delay and keeps its retries.
"""

from __future__ import annotations

import time
import zlib
from functools import lru_cache

from dramatiq.rate_limits import RateLimiterBackend, WindowRateLimiter

from fleet.shared.capabilities import capabilities
from fleet.shared.config import get_settings
from fleet.shared.db import get_pool, one, redis_url


def _ttl(ms: int) -> float:
    return ms / 1000.0


class PostgresBackend(RateLimiterBackend):
    """Counters in the unlogged table rate_limit_counters; each operation is one statement or one
    short transaction, serialised per key family by a transaction-scoped advisory lock where it sums."""

    def add(self, key, value, ttl):
        with get_pool().connection() as conn:
            row = conn.execute(
                "insert into rate_limit_counters (key, value, expires_at)"
                " values (%s, %s, clock_timestamp() + %s * interval '1 second')"
                " on conflict (key) do update set value = excluded.value, expires_at = excluded.expires_at"
                " where rate_limit_counters.expires_at < clock_timestamp() returning true",
                (key, value, _ttl(ttl)),
            ).fetchone()
        return row is not None

    def incr(self, key, amount, maximum, ttl):
        if amount > maximum:
            return False
        with get_pool().connection() as conn:
            row = conn.execute(
                "insert into rate_limit_counters as c (key, value, expires_at)"
                " values (%(k)s, %(a)s, clock_timestamp() + %(t)s * interval '1 second')"
                " on conflict (key) do update set"
                "  value = case when c.expires_at < clock_timestamp() then %(a)s else c.value + %(a)s end,"
                "  expires_at = clock_timestamp() + %(t)s * interval '1 second'"
                " where c.expires_at < clock_timestamp() or c.value + %(a)s <= %(m)s returning value",
                {"k": key, "a": amount, "m": maximum, "t": _ttl(ttl)},
            ).fetchone()
        return row is not None

    def decr(self, key, amount, minimum, ttl):
        with get_pool().connection() as conn:
            row = conn.execute(
                "update rate_limit_counters set value = value - %(a)s,"
                " expires_at = clock_timestamp() + %(t)s * interval '1 second'"
                " where key = %(k)s and expires_at >= clock_timestamp() and value - %(a)s >= %(m)s returning value",
                {"k": key, "a": amount, "m": minimum, "t": _ttl(ttl)},
            ).fetchone()
        return row is not None

    def incr_and_sum(self, key, keys, amount, maximum, ttl):
        family = key.rsplit("@", 1)[0]
        with get_pool().connection() as conn, conn.transaction():
            conn.execute("select pg_advisory_xact_lock(%s)", (zlib.crc32(family.encode()),))
            total = one(
                conn.execute(
                    "select coalesce(sum(value), 0) from rate_limit_counters"
                    " where key = any(%s) and expires_at >= clock_timestamp()",
                    (list(keys()),),
                ).fetchone()
            )[0]
            if total + amount > maximum:
                return False
            conn.execute(
                "insert into rate_limit_counters as c (key, value, expires_at)"
                " values (%(k)s, %(a)s, clock_timestamp() + %(t)s * interval '1 second')"
                " on conflict (key) do update set"
                "  value = case when c.expires_at < clock_timestamp() then %(a)s else c.value + %(a)s end,"
                "  expires_at = clock_timestamp() + %(t)s * interval '1 second'",
                {"k": key, "a": amount, "t": _ttl(ttl)},
            )
        return True

    def wait(self, key, timeout):
        """Poll for a notification left by wait_notify (barriers); True if one came in time."""
        deadline = time.monotonic() + timeout / 1000
        while time.monotonic() < deadline:
            with get_pool().connection() as conn:
                if conn.execute(
                    "select 1 from rate_limit_counters where key = %s and expires_at >= clock_timestamp()",
                    (f"{key}:notify",),
                ).fetchone():
                    return True
            time.sleep(0.05)
        return False

    def wait_notify(self, key, ttl):
        self.add(f"{key}:notify", 1, ttl)


@lru_cache(maxsize=1)
def backend() -> RateLimiterBackend:
    settings = get_settings()
    if capabilities(settings).rate_limits == "redis":
        from dramatiq.rate_limits.backends import RedisBackend

        return RedisBackend(url=redis_url(settings))
    return PostgresBackend()


def per_minute(key: str, limit: int) -> WindowRateLimiter | None:
    """A sliding one-minute window shared by all processes; None when the limit is 0 (off)."""
    if limit <= 0:
        return None
    return WindowRateLimiter(backend(), f"fleet:{key}", limit=limit, window=60)
