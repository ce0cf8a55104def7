"""`fleet demo`: embedded services, migrations, worker processes, a real mixed workload, progress, summary."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid

from .config import get_settings


def _bar(done: int, total: int, width: int = 40) -> str:
    filled = int(width * done / total) if total else width
    return "[" + "#" * filled + "." * (width - filled) + f"] {done}/{total}"


def _counts(conn, trace_id: str) -> dict[str, int]:
    rows = conn.execute(
        "select type, count(distinct job_id) from bus_events where trace_id = %s"
        " and type in ('job.succeeded', 'job.dead', 'job.retrying') group by type",
        (trace_id,),
    ).fetchall()
    return dict(rows)


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM (workers finish or requeue what they hold), SIGKILL only if it will not stop."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)  # dramatiq's main process passes it on to its workers
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_demo(*, jobs: int = 5000, processes: int = 2, threads: int = 8, keep_services: bool = False) -> int:
    from .cli import worker_command, worker_env
    from .client import FleetClient
    from .db import connect
    from .migrate import migrate
    from .services import EmbeddedPostgres, EmbeddedRedis, free_port

    settings = get_settings()
    started_pg = settings.database_url is None and not EmbeddedPostgres(settings.home).running()
    started_redis = settings.broker == "redis" and settings.redis_url is None and not EmbeddedRedis(settings.home).running()
    print(f"fleet demo: broker={settings.broker}, {jobs} jobs, {processes} worker process(es) x {threads} threads")
    t0 = time.monotonic()
    with connect() as conn:
        migrate(conn)
    print(f"  services up and migrated in {time.monotonic() - t0:.1f}s")

    metrics_port = free_port()
    env = worker_env(None, metrics_port)
    workers = subprocess.Popen(worker_command(None, processes, threads, metrics_port), env=env,
                               start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        trace_id = str(uuid.uuid4())
        rng = random.Random(7)
        payloads = []
        for i in range(jobs):
            roll = rng.random()
            if roll < 0.02:
                payloads.append({"message": f"job {i}", "fail": "permanent"})  # goes to the dead letters
            elif roll < 0.07:
                payloads.append({"message": f"job {i}", "fail": "transient", "fail_attempts": 1})  # retried once
            elif roll < 0.10:
                payloads.append({"message": f"job {i}", "sleep_ms": rng.randint(5, 50)})
            else:
                payloads.append({"message": f"job {i}"})
        client = FleetClient()
        t_enqueue = time.monotonic()
        client.enqueue_many("echo", payloads, trace_id=trace_id)
        enqueue_s = time.monotonic() - t_enqueue
        print(f"  enqueued {jobs} echo jobs in {enqueue_s * 1000:.0f} ms ({jobs / enqueue_s:,.0f} jobs/s), trace {trace_id}")

        t_start = time.monotonic()
        deadline = t_start + max(120, jobs / 50)
        with connect() as conn:
            while True:
                counts = _counts(conn, trace_id)
                done = counts.get("job.succeeded", 0) + counts.get("job.dead", 0)
                print("\r  " + _bar(done, jobs), end="", flush=True)
                if done >= jobs:
                    break
                if time.monotonic() > deadline:
                    print(f"\nfleet demo: only {done} of {jobs} jobs finished in time", file=sys.stderr)
                    return 1
                if workers.poll() is not None:
                    print("\nfleet demo: the worker processes exited early", file=sys.stderr)
                    return 1
                time.sleep(0.2)
        elapsed = time.monotonic() - t_start
        print()
        print("  summary:")
        print(f"    done     {counts.get('job.succeeded', 0)}")
        print(f"    retried  {counts.get('job.retrying', 0)}")
        print(f"    dead     {counts.get('job.dead', 0)}  (see: fleet dlq list --queue echo)")
        print(f"    rate     {jobs / elapsed:,.0f} jobs/s over {elapsed:.1f}s")
        print(f"    story    fleet events --trace {trace_id} | head")
        return 0
    finally:
        stop_process(workers)
        if not keep_services:
            if started_redis:
                EmbeddedRedis(settings.home).down()
            if started_pg:
                EmbeddedPostgres(settings.home).down()
            print("  stopped the workers and the services this demo started")
        else:
            print("  stopped the workers; services left running (fleet services down)")
