"""Who leads the scheduler, as the database knows it: the connection holding the leader's advisory lock.

The scheduler takes the lock; metrics and `fleet status` read it here, from pg_locks, without importing
the scheduler (which would tie the metrics to the SDK and the brokers)."""

from __future__ import annotations

from fleet.shared.db import get_pool

LEADER_LOCK_KEY = 0x666C656574_02


def current_leader() -> str | None:
    """The application name of the connection holding the leader lock, if any."""
    with get_pool().connection() as conn:
        row = conn.execute(
            "select a.application_name from pg_locks l join pg_stat_activity a on a.pid = l.pid"
            " where l.locktype = 'advisory' and l.granted"
            " and ((l.classid::bigint << 32) | l.objid::bigint) = %s",
            (LEADER_LOCK_KEY,),
        ).fetchone()
    return row[0] if row else None
