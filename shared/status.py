"""What the fleet looks like right now: per-queue depth, age, in flight, dead letters; readiness."""

from __future__ import annotations

import time
from typing import cast

from dramatiq import Message

from fleet.shared.capabilities import capabilities
from fleet.shared.config import get_settings
from fleet.shared.db import get_pool, redis_url

REDIS_NAMESPACE = "dramatiq"


def _dead_letter_counts() -> dict[str, int]:
    with get_pool().connection() as conn:
        return dict(
            conn.execute("select queue, count(*) from dead_letters where retried_at is null group by queue").fetchall()
        )


def _recent_outcomes(window_s: int = 60) -> dict[tuple[str, str], int]:
    with get_pool().connection() as conn:
        rows = conn.execute(
            "select queue, type, count(*) from bus_events where created_at >= now() - %s * interval '1 second'"
            " and type in ('job.succeeded', 'job.dead', 'job.retrying') group by queue, type",
            (window_s,),
        ).fetchall()
    return {(q, t): n for q, t, n in rows}


def _pgmq_stats() -> list[dict]:
    with get_pool().connection() as conn:
        rows = conn.execute(
            "select queue_name, queue_length, queue_visible_length, coalesce(oldest_msg_age_sec, 0)"
            " from pgmq.metrics_all() order by queue_name"
        ).fetchall()
    return [{"queue": q, "depth": n, "visible": v, "in_flight": n - v, "oldest_age_s": age} for q, n, v, age in rows]


def _redis_stats() -> list[dict]:
    import redis

    client = redis.Redis.from_url(redis_url(get_settings()))
    try:
        names = set()
        for key in client.scan_iter(match=f"{REDIS_NAMESPACE}:*.msgs", count=1000):
            name = key.decode()[len(REDIS_NAMESPACE) + 1 : -len(".msgs")]
            names.add(name.removesuffix(".DQ").removesuffix(".XQ"))
        stats = []
        for q in sorted(names):
            full = f"{REDIS_NAMESPACE}:{q}"
            depth = client.hlen(f"{full}.msgs") + client.hlen(f"{full}.DQ.msgs")
            visible = client.llen(full)
            oldest = 0
            first = client.lindex(full, 0)
            if first:
                data = client.hget(f"{full}.msgs", first)
                if data:
                    oldest = max(0, int(time.time() - Message.decode(cast(bytes, data)).message_timestamp / 1000))
            stats.append(
                {"queue": q, "depth": depth, "visible": visible, "in_flight": depth - visible, "oldest_age_s": oldest}
            )
        return stats
    finally:
        client.close()


def queue_stats(*, with_recent: bool = False) -> list[dict]:
    stats = _redis_stats() if capabilities().queues_in_redis else _pgmq_stats()
    dead = _dead_letter_counts()
    known = {s["queue"] for s in stats}
    stats += [{"queue": q, "depth": 0, "visible": 0, "in_flight": 0, "oldest_age_s": 0} for q in dead if q not in known]
    recent = _recent_outcomes() if with_recent else {}
    for s in stats:
        s["dead_letters"] = dead.get(s["queue"], 0)
        if with_recent:
            s["succeeded_1m"] = recent.get((s["queue"], "job.succeeded"), 0)
            s["failed_1m"] = recent.get((s["queue"], "job.dead"), 0)
            s["retried_1m"] = recent.get((s["queue"], "job.retrying"), 0)
    return sorted(stats, key=lambda s: s["queue"])


def check_ready() -> None:
    with get_pool().connection() as conn:
        conn.execute("select 1")
    if capabilities().queues_in_redis:
        import redis

        client = redis.Redis.from_url(redis_url(get_settings()), socket_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
