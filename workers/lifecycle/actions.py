"""Memory lifecycle: expire, archive, decay, evict, merge, re-embed, purge, in bounded batches.

Every change is a status or confidence change recorded in memory_lifecycle_actions (so `undo_run`
can put it back); the one hard delete is purging the payloads of memories deleted longer than
LIFECYCLE_PURGE_AFTER_DAYS ago. Pinned memories are never touched. Each batch selects its rows
`for update skip locked` and re-checks their state, so two runs at once never apply an action twice.
A dry run takes no row lock on the real tables: it runs the same statements on private copies (see
_private_copies), so its counts are exactly what a run would do and a real run meanwhile skips nothing.
"""

from __future__ import annotations

import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field

import psycopg

from fleet.shared import events
from fleet.shared.config import Settings, get_settings
from fleet.shared.db import get_pool, one
from fleet.shared.metrics import metrics

ACTIONS = ("expire", "archive", "decay", "evict", "merge", "reembed", "purge")

# Rows an action may take: activated or archived, never pinned, in the run's project (if any).
SCOPE = "not m.pinned and (%(project)s::text is null or m.project_id = %(project)s)"

STATUS_ACTIONS = {
    "expire": (
        "m.status in ('activated', 'archived') and (m.expires_at < now() or"
        " (jsonb_typeof(m.governance -> 'ttl_s') = 'number'"
        "  and m.created_at + (m.governance ->> 'ttl_s')::numeric * interval '1 second' < now()))",
        "expired",
    ),
    "archive": (
        "m.status = 'activated' and m.last_accessed_at < now() - %(archive_days)s * interval '1 day'",
        "archived",
    ),
}

RECORD = (
    "insert into memory_lifecycle_actions (run_id, memory_id, action, from_status, to_status, from_confidence,"
    " to_confidence, merged_into) select %(run)s, id, %(action)s, from_status, to_status, from_confidence,"
    " to_confidence, merged_into from changed"
)


@dataclass
class LifecycleResult:
    run_id: str
    dry_run: bool
    counts: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0


def _params(settings: Settings, project: str | None, run_id: str, batch: int, dry_run: bool) -> dict:
    return {
        "project": project,
        "dry_run": dry_run,
        "run": run_id,
        "batch": batch,
        "archive_days": settings.lifecycle_archive_after_days,
        "half_life_days": settings.lifecycle_decay_half_life_days,
        "min_conf": settings.lifecycle_min_confidence,
        "threshold": settings.lifecycle_merge_threshold,
        "purge_days": settings.lifecycle_purge_after_days,
        "model": settings.embedding_model_default,
    }


BATCH_TAIL = (
    "select (select count(*) from recorded), (select count(*) from picked),"
    " (select id from picked order by id desc limit 1)"
)


def _loop(conn: psycopg.Connection, sql: str, params: dict) -> int:
    """Run one batch statement over the table in id order (keyset: each batch starts after the last id
    it saw, so a run over millions of rows reads each row once); each batch is its own transaction."""
    total, after = 0, uuid.UUID(int=0)
    while True:
        with conn.transaction():
            changed, picked, last = one(conn.execute(sql, params | {"after": after}).fetchone())
        total += changed
        if picked < params["batch"] or last is None:
            return total
        after = last


def _status_action(conn, action: str, params: dict) -> int:
    predicate, to_status = STATUS_ACTIONS[action]
    return _loop(
        conn,
        f"""
        with picked as (select m.id, m.status from memories m where m.id > %(after)s and {predicate} and {SCOPE}
                        order by m.id limit %(batch)s for update skip locked),
        changed as (update memories m set status = '{to_status}', status_changed_at = now(), updated_at = now()
                    from picked where m.id = picked.id
                    returning m.id, picked.status as from_status, m.status as to_status,
                              null::real as from_confidence, null::real as to_confidence, null::uuid as merged_into),
        recorded as ({RECORD} returning 1)
        {BATCH_TAIL}""",
        params | {"action": action},
    )


def _decay(conn, params: dict) -> int:
    since = "greatest(coalesce(m.confidence_decayed_at, m.last_accessed_at), m.last_accessed_at)"
    predicate = f"m.status = 'activated' and m.confidence > %(min_conf)s and {since} < now() - interval '1 day'"
    return _loop(
        conn,
        f"""
        with picked as (select m.id, m.confidence, {since} as since from memories m
                        where m.id > %(after)s and {predicate} and {SCOPE}
                        order by m.id limit %(batch)s for update skip locked),
        changed as (update memories m set
                      confidence = greatest(%(min_conf)s, picked.confidence * power(0.5,
                          extract(epoch from now() - picked.since) / (%(half_life_days)s * 86400.0)))::real,
                      confidence_decayed_at = now(), updated_at = now()
                    from picked where m.id = picked.id
                    returning m.id, m.status as from_status, m.status as to_status,
                              picked.confidence as from_confidence, m.confidence as to_confidence,
                              null::uuid as merged_into),
        recorded as ({RECORD} returning 1)
        {BATCH_TAIL}""",
        params | {"action": "decay"},
    )


def _evict(conn, params: dict, caps: dict[str, int]) -> int:
    """Once a type passes 80% of its cap in a project, archive oldest, lowest-confidence first down to 80%."""
    total = 0
    for type_, cap in caps.items():
        keep = int(cap * 0.8)
        groups = conn.execute(
            "select m.project_id, count(*) - %(keep)s from memories m where m.status = 'activated' and m.type = "
            "%(type)s"
            " and (%(project)s::text is null or m.project_id = %(project)s) group by m.project_id"
            " having count(*) > %(keep)s",
            params | {"type": type_, "keep": keep},
        ).fetchall()
        for project_id, excess in groups:
            remaining = excess
            while remaining > 0:
                with conn.transaction():
                    # recount under lock so a concurrent run cannot push the group below its floor
                    # (a dry run works on its private copy: nothing to serialise with, nobody to block)
                    if not params["dry_run"]:
                        conn.execute("select pg_advisory_xact_lock(hashtext(%s))", (f"evict:{project_id}:{type_}",))
                    excess_now = conn.execute(
                        "select count(*) - %s from memories where status = 'activated' and type = %s and project_id "
                        "= %s",
                        (keep, type_, project_id),
                    ).fetchone()[0]
                    n = conn.execute(
                        f"""
                        with picked as (select m.id from memories m where m.status = 'activated' and m.type = %(type)s
                                        and m.project_id = %(p)s and {SCOPE}
                                        order by m.confidence, m.last_accessed_at, m.created_at
                                        limit least(%(batch)s, greatest(%(excess)s, 0)) for update skip locked),
                        changed as (update memories m set status = 'archived', status_changed_at = now(),
                                        updated_at = now()
                                    from picked where m.id = picked.id
                                    returning m.id, 'activated'::text as from_status, m.status as to_status,
                                              null::real as from_confidence, null::real as to_confidence,
                                              null::uuid as merged_into),
                        recorded as ({RECORD} returning 1)
                        select count(*) from recorded""",
                        params | {"type": type_, "p": project_id, "excess": excess_now, "action": "evict"},
                    ).fetchone()[0]
                total += n
                remaining = min(remaining, excess_now) - n
                if n == 0:
                    break
    return total


MERGE_PAIRS = """
    select a.id as loser, nn.id as keeper
    from memories a
    cross join lateral (
        select b.id, b.pinned, b.created_at, b.embedding <=> a.embedding as distance
        from memories b
        where b.status = 'activated' and b.project_id = a.project_id and b.type = a.type
          and b.id <> a.id and b.embedding is not null
        order by b.embedding <=> a.embedding limit 1
    ) nn
    where a.status = 'activated' and a.embedding is not null and a.id > %(after)s
      and not a.pinned and (%(project)s::text is null or a.project_id = %(project)s)
      and nn.distance < 1 - %(threshold)s
      and (nn.pinned or nn.created_at > a.created_at or (nn.created_at = a.created_at and nn.id > a.id))
"""


def _merge(conn, params: dict) -> int:
    """Near-duplicates by real vector similarity: the older, unpinned one is merged into the newer or pinned."""
    total, after = 0, uuid.UUID(int=0)
    while True:
        ids = [
            r[0]
            for r in conn.execute(
                "select m.id from memories m where m.status = 'activated' and m.embedding is not null and m.id > "
                "%(after)s"
                " and (%(project)s::text is null or m.project_id = %(project)s) order by m.id limit %(batch)s",
                params | {"after": after},
            ).fetchall()
        ]
        if not ids:
            return total
        window = params | {"after": after, "last": ids[-1]}
        with conn.transaction():
            total += conn.execute(
                f"""
                    with pairs as ({MERGE_PAIRS} and a.id <= %(last)s),
                    picked as (select m.id, pairs.keeper from memories m join pairs on pairs.loser = m.id
                               where m.status = 'activated' and pairs.keeper not in (select loser from pairs)
                               for update of m skip locked),
                    changed as (update memories m set status = 'merged', merged_into = picked.keeper,
                                status_changed_at = now(), updated_at = now()
                                from picked where m.id = picked.id
                                returning m.id, 'activated'::text as from_status, m.status as to_status,
                                          null::real as from_confidence, null::real as to_confidence,
                                          m.merged_into as merged_into),
                    recorded as ({RECORD} returning 1)
                    select count(*) from recorded""",
                window | {"action": "merge"},
            ).fetchone()[0]
        after = ids[-1]


def _reembed(conn, params: dict, enqueue) -> int:
    """Memories without an embedding, or with one from another model: embed_memories jobs, 100 ids each."""
    total = 0
    after: uuid.UUID | str = uuid.UUID(int=0)
    while True:
        ids = [
            str(r[0])
            for r in conn.execute(
                "select m.id from memories m join memory_payloads p on p.memory_id = m.id"
                " where m.status = 'activated' and (m.embedding is null or m.embedding_model is distinct from "
                "%(model)s)"
                " and p.content is not null and m.id > %(after)s and (%(project)s::text is null or m.project_id = "
                "%(project)s)"
                " order by m.id limit %(batch)s",
                params | {"after": after},
            ).fetchall()
        ]
        if not ids:
            return total
        total += len(ids)
        enqueue([{"ids": ids[i : i + 100]} for i in range(0, len(ids), 100)])
        after = ids[-1]


def _purge(conn, params: dict) -> int:
    predicate = (
        "m.status = 'deleted' and m.status_changed_at < now() - %(purge_days)s * interval '1 day'"
        " and exists (select 1 from memory_payloads p where p.memory_id = m.id)"
    )
    return _loop(
        conn,
        f"""
        with picked as (select m.id, m.status from memories m where m.id > %(after)s and {predicate} and {SCOPE}
                        order by m.id limit %(batch)s for update skip locked),
        purged as (delete from memory_payloads p using picked where p.memory_id = picked.id returning p.memory_id),
        changed as (select memory_id as id, 'deleted'::text as from_status, 'deleted'::text as to_status,
                           null::real as from_confidence, null::real as to_confidence, null::uuid as merged_into
                    from purged),
        recorded as ({RECORD} returning 1)
        {BATCH_TAIL}""",
        params | {"action": "purge"},
    )


def _private_copies(conn: psycopg.Connection, params: dict, actions) -> None:
    """Temporary copies of the memories in the run's scope (and of their payloads' presence), named like the
    real tables: temporary tables come first in the search path, so the run's statements read and change the
    copies, which the rollback drops. Copying is a plain snapshot read: no row of the real tables is locked."""
    conn.execute(
        "create temp table memories (like public.memories including defaults including constraints) on commit drop"
    )
    conn.execute(
        "insert into pg_temp.memories select * from public.memories m"
        " where %(project)s::text is null or m.project_id = %(project)s",
        params,
    )
    conn.execute("alter table pg_temp.memories add primary key (id)")
    if (
        "merge" in actions
        and conn.execute("select 1 from pg_temp.memories where embedding is not null limit 1").fetchone()
    ):
        conn.execute(
            "create index on pg_temp.memories using hnsw (embedding vector_cosine_ops) where status = 'activated'"
        )
    conn.execute("create temp table memory_payloads (like public.memory_payloads including defaults) on commit drop")
    conn.execute(  # only whether content exists matters to reembed and purge: not the content itself
        "insert into pg_temp.memory_payloads (memory_id, content) select p.memory_id,"
        " case when p.content is null then null else '' end"
        " from public.memory_payloads p join pg_temp.memories m on m.id = p.memory_id"
    )
    conn.execute("alter table pg_temp.memory_payloads add primary key (memory_id)")
    conn.execute(
        "create temp table memory_lifecycle_actions (like public.memory_lifecycle_actions including defaults)"
        " on commit drop"
    )
    conn.execute("analyze pg_temp.memories")


def _run_action(conn, action: str, params: dict, settings: Settings, enqueue) -> int:
    if action in STATUS_ACTIONS:
        return _status_action(conn, action, params)
    if action == "decay":
        return _decay(conn, params)
    if action == "evict":
        return _evict(conn, params, settings.lifecycle_type_caps)
    if action == "merge":
        return _merge(conn, params)
    if action == "reembed":
        return _reembed(conn, params, enqueue)
    if action == "purge":
        return _purge(conn, params)
    raise ValueError(f"unknown lifecycle action {action!r}; known: {', '.join(ACTIONS)}")


def run_lifecycle(
    *,
    project: str | None = None,
    dry_run: bool = False,
    actions: list[str] | None = None,
    batch_size: int | None = None,
    settings: Settings | None = None,
    enqueue=None,
    trace: dict | None = None,
) -> LifecycleResult:
    settings = settings or get_settings()
    run_id = str(uuid.uuid4())
    params = _params(settings, project, run_id, batch_size or settings.lifecycle_batch_size, dry_run)
    result = LifecycleResult(run_id, dry_run)
    started = time.monotonic()
    if enqueue is None:
        from fleet.shared.client import FleetClient

        client = FleetClient()

        def enqueue_embeddings(payloads):
            return client.enqueue_many("embed_memories", payloads, trace_id=(trace or {}).get("trace_id"))

        enqueue = enqueue_embeddings

    with get_pool().connection() as conn:
        # A dry run does the real work on private copies inside one transaction that is rolled back: its
        # counts are exactly what a run would do (later actions see earlier ones), and nothing changes.
        with conn.transaction(force_rollback=True) if dry_run else nullcontext():
            if dry_run:
                _private_copies(conn, params, actions or ACTIONS)
            for action in actions or ACTIONS:
                result.counts[action] = _run_action(
                    conn, action, params, settings, (lambda _: None) if dry_run else enqueue
                )
    if not dry_run:
        for action, n in result.counts.items():
            if n:
                metrics().lifecycle_actions.labels(action).inc(n)
    result.duration_s = time.monotonic() - started
    events.emit(
        "lifecycle.done",
        **(trace or {}),
        run_id=run_id,
        project=project,
        dry_run=dry_run,
        counts=result.counts,
        duration_ms=round(result.duration_s * 1000, 1),
    )
    return result


def undo_run(run_id: str) -> int:
    """Put back what a run changed (status, confidence, merge), where nothing changed the row since."""
    with get_pool().connection() as conn, conn.transaction():
        return conn.execute(
            "update memories m set status = coalesce(a.from_status, m.status),"
            " confidence = coalesce(a.from_confidence, m.confidence),"
            " merged_into = case when a.action = 'merge' then null else m.merged_into end,"
            " status_changed_at = now(), updated_at = now()"
            " from memory_lifecycle_actions a where a.run_id = %s and a.memory_id = m.id and a.action <> 'purge'"
            " and m.status = a.to_status and (a.to_confidence is null or m.confidence = a.to_confidence)",
            (run_id,),
        ).rowcount
