"""Test helpers: real worker processes, waiting on bus_events, and a clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import psycopg

from shared.cli import worker_command
from shared.services import free_port


def wait_for(predicate, timeout: float = 30, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def events(dsn: str, *, trace_id: str | None = None, job_id: str | None = None, type: str | None = None) -> list[dict]:
    where, params = [], []
    if trace_id:
        where.append("trace_id = %s"); params.append(trace_id)
    if job_id:
        where.append("job_id = %s"); params.append(job_id)
    if type:
        where.append("type = %s"); params.append(type)
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


class WorkerGroup:
    """`dramatiq workers` as real processes, in their own process group so a test can SIGKILL them all."""

    def __init__(self, env: dict, *, processes: int = 1, threads: int = 4, metrics: bool = False, log_dir: Path,
                 queues: list[str] | None = None):
        self.env = dict(env)
        self.queues = queues
        self.processes = processes
        self.threads = threads
        self.metrics_port = free_port() if metrics else 0
        self.log_path = log_dir / f"workers-{uuid.uuid4().hex[:8]}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "WorkerGroup":
        env = dict(self.env)
        mdir = self.log_path.with_suffix(".metrics")
        mdir.mkdir(parents=True, exist_ok=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(mdir)
        if self.metrics_port:
            env["FLEET_METRICS_PORT"] = str(self.metrics_port)
        cmd = worker_command(self.queues, self.processes, self.threads, self.metrics_port)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=Path(__file__).resolve().parent.parent)
        # dramatiq handles SIGTERM only once its workers have booted: wait for them.
        wait_for(lambda: self.logs().count("Worker process is ready for action.") >= self.processes or not self.alive(),
                 60, what="worker processes to boot")
        assert self.alive(), f"workers exited at start:\n{self.logs()[-3000:]}"
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole group: no chance to requeue or ack."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM to dramatiq's main process, which stops its workers gracefully."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode if self.proc else 0

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def running_workers(env: dict, log_dir: Path, **kwargs):
    group = WorkerGroup(env, log_dir=log_dir, **kwargs).start()
    try:
        yield group
    finally:
        group.terminate()


def pgmq_send(dsn: str, queue: str, body) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("select pgmq.send(%s, %s::jsonb)", (queue, json.dumps(body) if not isinstance(body, str) else body)).fetchone()[0]
