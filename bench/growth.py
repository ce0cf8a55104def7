"""The cost of growth, printed as `name: value` lines (bench/run.py collects them).

python -m bench.growth processes   # echo jobs drained by 1, 2 and 4 real worker processes (full stack)
python -m bench.growth depth       # raw read+delete rate with 10k and with 1M messages waiting, the
                                   # queue table's size once drained, and after VACUUM
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

from fleet.shared.config import get_settings
from fleet.shared.db import database_dsn

JOBS = 20_000
DEPTH_QUEUE = "bench_depth"
DRAIN = 20_000  # messages read and deleted in each depth measurement


def processes() -> None:
    from fleet.ops.processes import WorkerGroup, wait_for, worker_env
    from fleet.shared.client import FleetClient

    dsn = database_dsn(get_settings())
    client = FleetClient()
    logs = Path(tempfile.mkdtemp(prefix="fleet-bench-growth-"))
    for count in (1, 2, 4):
        env = worker_env(["echo"])
        group = WorkerGroup(env, processes=count, threads=8, log_dir=logs, queues=["echo"]).start()
        try:
            trace = str(uuid.uuid4())
            started = time.monotonic()
            client.enqueue_many("echo", [{"message": str(i)} for i in range(JOBS)], trace_id=trace)

            def done():
                with psycopg.connect(dsn, autocommit=True) as conn:
                    return conn.execute(
                        "select count(*) >= %s from bus_events where trace_id = %s and type = 'job.succeeded'",
                        (JOBS, trace),
                    ).fetchone()[0]

            wait_for(done, 600, 0.1, what=f"{JOBS} echo jobs")
            print(f"growth_drain_{count}proc_jobs_per_s: {JOBS / (time.monotonic() - started):.1f}", flush=True)
        finally:
            group.terminate()
    client.broker.close()


def _fill(conn: psycopg.Connection, n: int) -> None:
    for start in range(0, n, 50_000):
        conn.execute(
            "select pgmq.send_batch(%s, array(select jsonb_build_object('n', g) from generate_series(1, %s) g))",
            (DEPTH_QUEUE, min(50_000, n - start)),
        )


def _drain_rate(conn: psycopg.Connection, n: int) -> float:
    started = time.monotonic()
    left = n
    while left:
        ids = [r[0] for r in conn.execute("select msg_id from pgmq.read(%s, 30, %s)", (DEPTH_QUEUE, min(100, left)))]
        conn.execute("select pgmq.delete(%s, %s::bigint[])", (DEPTH_QUEUE, ids))
        left -= len(ids)
    return n / (time.monotonic() - started)


def _table_mb(conn: psycopg.Connection) -> float:
    return conn.execute("select pg_total_relation_size(%s) / 1048576.0", (f"pgmq.q_{DEPTH_QUEUE}",)).fetchone()[0]


def depth() -> None:
    with psycopg.connect(database_dsn(get_settings()), autocommit=True) as conn:
        for waiting, label in ((10_000, "10k"), (1_000_000, "1m")):
            if conn.execute("select 1 from pgmq.meta where queue_name = %s", (DEPTH_QUEUE,)).fetchone():
                conn.execute("select pgmq.drop_queue(%s)", (DEPTH_QUEUE,))
            conn.execute("select pgmq.create(%s)", (DEPTH_QUEUE,))
            started = time.monotonic()
            _fill(conn, waiting + DRAIN)
            conn.execute(f"vacuum analyze pgmq.q_{DEPTH_QUEUE}")
            print(f"growth_fill_{label}_s: {time.monotonic() - started:.2f}", flush=True)
            print(f"growth_read_delete_{label}_waiting_per_s: {_drain_rate(conn, DRAIN):.1f}", flush=True)
            if waiting == 1_000_000:
                # Drain everything: the deleted rows stay in the table until VACUUM marks them reusable.
                full = _table_mb(conn)
                conn.execute(f"delete from pgmq.q_{DEPTH_QUEUE}")  # what consumers' deletes add up to
                _fill(conn, DRAIN)
                print(f"growth_read_delete_after_purge_per_s: {_drain_rate(conn, DRAIN):.1f}", flush=True)
                print(f"growth_table_mb_full: {full:.1f}", flush=True)
                print(f"growth_table_mb_drained: {_table_mb(conn):.1f}", flush=True)
                conn.execute(f"vacuum full pgmq.q_{DEPTH_QUEUE}")
                print(f"growth_table_mb_after_vacuum_full: {_table_mb(conn):.1f}", flush=True)
        conn.execute("select pgmq.drop_queue(%s)", (DEPTH_QUEUE,))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["processes", "depth"])
    args = p.parse_args()
    {"processes": processes, "depth": depth}[args.what]()


if __name__ == "__main__":
    main()
