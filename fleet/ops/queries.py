"""The SQL the operator commands read with (the commands themselves hold none)."""

from __future__ import annotations

from psycopg import sql
from psycopg.rows import dict_row

from fleet.shared.db import get_pool, one


def run_outcome(trace_id: str) -> tuple[str, dict] | None:
    """The last lifecycle.done or job.dead event of a trace: (type, payload), or None while it runs."""
    with get_pool().connection() as conn:
        return conn.execute(
            "select type, payload from bus_events where trace_id = %s"
            " and type in ('lifecycle.done', 'job.dead') order by id desc limit 1",
            (trace_id,),
        ).fetchone()


def upgrade_run(run_id: str) -> dict | None:
    with get_pool().connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "select template_name, to_version, dry_run, status, counts from upgrade_runs where id = %s", (run_id,)
        ).fetchone()


def job_events(*, trace_id: str | None = None, job_id: str | None = None, limit: int = 1000) -> list[dict]:
    """A trace's or a job's events in order (at least one of the two is given)."""
    clauses = [
        sql.SQL(clause) for clause, value in (("trace_id = %(trace)s", trace_id), ("job_id = %(job)s", job_id)) if value
    ]
    if not clauses:
        raise ValueError("give a trace id or a job id")
    query = sql.SQL(
        "select created_at, type, queue, actor, job_id, payload from bus_events where {} order by id limit %(limit)s"
    ).format(sql.SQL(" and ").join(clauses))
    with get_pool().connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query, {"trace": trace_id, "job": job_id, "limit": limit}).fetchall()


# -- the demo and `fleet upgrade run --wait` ----------------------------------------------------------


def trace_outcomes(trace_id: str) -> dict[str, int]:
    """How many jobs of a trace succeeded, died, were retried."""
    with get_pool().connection() as conn:
        return dict(
            conn.execute(
                "select type, count(distinct job_id) from bus_events where trace_id = %s"
                " and type in ('job.succeeded', 'job.dead', 'job.retrying') group by type",
                (trace_id,),
            ).fetchall()
        )


def embed_progress(trace_id: str) -> tuple[int, int, int]:
    """(documents handled, jobs finished, documents embedded) of a trace's embed jobs: a job's latest
    embed.status says how many it embedded so far; its embed.done adds the unchanged ones it skipped."""
    with get_pool().connection() as conn:
        return one(
            conn.execute(
                "select coalesce(sum(handled), 0), count(*) filter (where finished), coalesce(sum(embedded), 0) from ("
                " select bool_or(type = 'embed.done') as finished,"
                "  max(case when type = 'embed.done' then (payload->>'embedded')::int + (payload->>'skipped')::int"
                "      else (payload->>'embedded')::int end) as handled,"
                "  max((payload->>'embedded')::int) filter (where type = 'embed.done') as embedded"
                " from bus_events where trace_id = %s and type in ('embed.status', 'embed.done') group by job_id) jobs",
                (trace_id,),
            ).fetchone()
        )


def stored_documents(source_prefix: str) -> int:
    with get_pool().connection() as conn:
        return one(
            conn.execute(
                "select count(*) from vector_documents where source_id like %s", (source_prefix + "%",)
            ).fetchone()
        )[0]


def seed_memories(project: str, memories: int) -> None:
    """Memories in a project: 10% past expiry, last access spread over 60 days, 2% pinned."""
    with get_pool().connection() as conn:
        conn.execute(
            "with seeded as (insert into memories (project_id, type, expires_at, last_accessed_at, confidence, pinned)"
            " select %s, (array['semantic', 'episodic'])[1 + g %% 2],"
            " case when g %% 10 = 0 then now() - interval '1 day' end,"
            " now() - (g %% 60) * interval '1 day', 0.3 + (g %% 70) / 100.0, g %% 50 = 0"
            " from generate_series(1, %s) g returning id)"
            " insert into memory_payloads (memory_id, content) select id, 'demo memory ' || id from seeded",
            (project, memories),
        )


def lifecycle_result(trace_id: str) -> dict | None:
    with get_pool().connection() as conn:
        row = conn.execute(
            "select payload from bus_events where trace_id = %s and type = 'lifecycle.done'", (trace_id,)
        ).fetchone()
    return row[0] if row else None


def agents_of_template(name: str) -> int:
    with get_pool().connection() as conn:
        return one(conn.execute("select count(*) from user_profiles where template_name = %s", (name,)).fetchone())[0]


def upgrade_progress(run_id: str) -> tuple[str, int, int, bool] | None:
    """(status, agents in the run, agents done, finished) of an upgrade run (None if there is no such run);
    the total is known once its fan-out has run (status no longer 'pending')."""
    with get_pool().connection() as conn:
        return conn.execute(
            "select r.status, coalesce((r.counts->>'total')::int, 0),"
            " (select count(*) from agent_upgrades u where u.run_id = r.id"
            "  and u.status in ('succeeded', 'failed', 'skipped', 'cancelled')), r.finished_at is not null"
            " from upgrade_runs r where r.id = %s",
            (run_id,),
        ).fetchone()
