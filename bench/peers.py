"""pgqueuer, the peer Postgres job queue, with its defaults: asyncpg (its documented driver), one
QueueManager, `run()`'s default batch size (10), no-op async entrypoint. Installed by the `bench` extra.

    python -m bench.peers drain --jobs N      enqueue N jobs (one batch insert), then drain them
"""

from __future__ import annotations

import argparse
import asyncio
import time

ENTRYPOINT = "bench_noop"


async def _connect():
    import asyncpg

    from fleet.shared.db import database_dsn

    return await asyncpg.connect(database_dsn())


async def prepare(jobs: int) -> float:
    """Install pgqueuer's schema once, empty its queue, enqueue `jobs` no-op jobs in one statement; returns
    the enqueue's seconds."""
    from pgqueuer import AsyncpgDriver, Queries

    conn = await _connect()
    try:
        queries = Queries(AsyncpgDriver(conn))
        if not await queries.has_table("pgqueuer"):
            await queries.install()
        await queries.clear_queue()
        await queries.clear_queue_log()
        t = time.perf_counter()
        await queries.enqueue([ENTRYPOINT] * jobs, [b"{}"] * jobs, [0] * jobs)
        return time.perf_counter() - t
    finally:
        await conn.close()


async def drain(jobs: int) -> float:
    """Seconds for a QueueManager with pgqueuer's defaults to run `jobs` waiting jobs and record them done."""
    from pgqueuer import AsyncpgDriver, PgQueuer
    from pgqueuer.types import QueueExecutionMode

    conn = await _connect()
    try:
        pgq = PgQueuer(AsyncpgDriver(conn))

        @pgq.entrypoint(ENTRYPOINT)
        async def noop(job) -> None:
            pass

        t = time.perf_counter()
        await pgq.qm.run(mode=QueueExecutionMode.drain)  # returns once the queue is empty and the jobs are done
        elapsed = time.perf_counter() - t
        left = await conn.fetchval("select count(*) from pgqueuer")
        if left:
            raise SystemExit(f"pgqueuer drain: {left} jobs left")
        return elapsed
    finally:
        await conn.close()


def main() -> None:
    from bench.dbcpu import ServerCpu
    from fleet.shared.db import database_dsn
    from fleet.shared.logs import configure_logging

    configure_logging("WARNING")
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["drain"])
    p.add_argument("--jobs", type=int, default=20000)
    a = p.parse_args()
    with ServerCpu(database_dsn()) as db_cpu:  # the PostgreSQL server's CPU over enqueue and drain
        enqueue_s = asyncio.run(prepare(a.jobs))
        drain_s = asyncio.run(drain(a.jobs))
    print(f"drain_pgqueuer_jobs_per_s: {a.jobs / drain_s:.0f}")
    print(f"drain_pgqueuer_enqueue_jobs_per_s: {a.jobs / enqueue_s:.0f}")
    if db_cpu.seconds is not None:
        print(f"drain_pgqueuer_db_cpu_ms_per_1k: {db_cpu.per_1k_ms(a.jobs):.1f}")


if __name__ == "__main__":
    main()
