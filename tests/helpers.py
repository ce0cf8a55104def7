"""Test helpers: real worker processes, waiting on bus_events, and a clean stop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import psycopg

from fleet.ops.processes import WorkerGroup, wait_for  # noqa: F401 (the tests import them from here)

ROOT = Path(__file__).resolve().parent.parent


def fleet_cli(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """The `fleet` command as an operator runs it, in its own process."""
    proc = subprocess.run(
        [sys.executable, "-m", "fleet.ops.cli", *args],
        capture_output=True,
        text=True,
        env=env or dict(os.environ),
        cwd=ROOT,
        timeout=120,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def events(dsn: str, *, trace_id: str | None = None, job_id: str | None = None, type: str | None = None) -> list[dict]:
    where, params = [], []
    if trace_id:
        where.append("trace_id = %s")
        params.append(trace_id)
    if job_id:
        where.append("job_id = %s")
        params.append(job_id)
    if type:
        where.append("type = %s")
        params.append(type)
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            f"select type, job_id, payload, created_at, queue, actor from bus_events where {' and '.join(where) or 'true'} order by id",
            params,
        ).fetchall()
    return [dict(zip(["type", "job_id", "payload", "created_at", "queue", "actor"], r)) for r in rows]


def dead_letters(dsn: str, trace_id: str | None = None, queue: str | None = None) -> list[dict]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(
            "select reason, error_class, attempts, message_id, raw, actor from dead_letters"
            " where (%s::uuid is null or trace_id = %s::uuid) and (%s::text is null or queue = %s) order by id",
            (trace_id, trace_id, queue, queue),
        )
        return [dict(zip(["reason", "error_class", "attempts", "message_id", "raw", "actor"], r)) for r in cur]


@contextmanager
def running_workers(env: dict, log_dir: Path, **kwargs):
    group = WorkerGroup(env, log_dir=log_dir, **kwargs).start()
    try:
        yield group
    finally:
        group.terminate()


def pgmq_send(dsn: str, queue: str, body) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            "select pgmq.send(%s, %s::jsonb)", (queue, json.dumps(body) if not isinstance(body, str) else body)
        ).fetchone()[0]
