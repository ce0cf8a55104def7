"""Embedding benchmarks, one per process run, printed as `name: value` lines.

python -m bench.embed docs     end-to-end documents/s through real worker processes and the simulator
                               at a fixed latency, against the simulator's rate measured directly
                               (same concurrency, same batches, no fleet) in the same run
python -m bench.embed upsert   pgvector upsert of 1024-dim vectors: the fleet's binary COPY path
                               against psycopg 3's (pipelined) executemany of single-row upserts
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import time
import uuid

import psycopg
from pgvector import Vector
from psycopg import sql
from psycopg.types.json import Jsonb

from fleet.shared.db import database_dsn, get_pool
from fleet.shared.vectors import with_vectors
from fleet.workers.embed.embedding import Doc, upsert_vectors

# A provider's batch of 32 typically answers in 0.5-2 s. At 2 s the provider is the binding limit
# here (128 docs/s); pgvector's HNSW insert on this machine (~8 ms a 1024-dim row) would bind first
# at lower latencies, and `upsert` below measures that limit on its own.
LATENCY_S = 2.0
BATCH = 32
THREADS = 8
JOBS = 16
DOCS_PER_JOB = 4 * BATCH


def bench_docs() -> None:
    from bench.provider import direct_rate
    from fleet.ops.processes import start_simulator, stop_process, worker_command, worker_env
    from fleet.shared.client import FleetClient
    from fleet.shared.config import get_settings

    sim, url = start_simulator({"latency_ms": LATENCY_S * 1000})
    env = worker_env(["embed"], 0) | {"EMBEDDING_API_BASE": f"{url}/v1", "EMBED_MAX_BATCH": str(BATCH)}
    os.environ["EMBEDDING_API_BASE"] = env["EMBEDDING_API_BASE"]
    workers = subprocess.Popen(
        worker_command(["embed"], 1, THREADS, 0),
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = FleetClient()
    dsn = database_dsn()
    try:
        run = uuid.uuid4().hex[:8]
        warm = str(uuid.uuid4())
        client.embed_documents([{"source_id": f"warm-{run}", "content": "warm up"}], trace_id=warm)
        wait_done(dsn, warm, 1)
        trace = str(uuid.uuid4())
        docs = [
            {"source_id": f"bench-{run}-{i}", "content": f"benchmark document {run} {i} " + "x" * 200}
            for i in range(JOBS * DOCS_PER_JOB)
        ]
        t = time.perf_counter()
        client.embed_documents(docs, docs_per_job=DOCS_PER_JOB, trace_id=trace)
        wait_done(dsn, trace, JOBS)
        elapsed = time.perf_counter() - t
        model = get_settings().embedding_model_default
        bodies = [
            {"model": model, "input": [d["content"] for d in docs[i : i + BATCH]]} for i in range(0, len(docs), BATCH)
        ]
        provider = direct_rate(f"{url}/v1/embeddings", bodies, THREADS, units_per_request=BATCH)
    finally:
        stop_process(workers)
        stop_process(sim, 5)
        client.broker.close()
    print(f"embed_docs_per_s: {len(docs) / elapsed:.0f}")
    print(f"embed_provider_direct_docs_per_s: {provider:.0f}")


def wait_done(dsn: str, trace: str, jobs: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while (
            conn.execute(
                "select count(*) from bus_events where trace_id = %s and type in ('embed.done', 'job.dead')", (trace,)
            ).fetchone()[0]
            < jobs
        ):
            if time.monotonic() > deadline:
                raise SystemExit("embedding benchmark: jobs did not finish")
            time.sleep(0.02)


def executemany_upsert(conn: psycopg.Connection, table: str, docs: list[Doc], vectors: list[list[float]]) -> None:
    """The baseline: executemany of single-row upserts (psycopg 3 pipelines it)."""
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            sql.SQL(
                "insert into {} (source_id, chunk_index, content, metadata, model, content_hash, embedding)"
                " values (%s, %s, %s, %s, %s, %s, %s) on conflict (source_id, chunk_index) do update set"
                " embedding = excluded.embedding, content_hash = excluded.content_hash, updated_at = now()"
            ).format(sql.Identifier(table)),
            [
                (d.source_id, d.chunk_index, d.content, Jsonb(d.metadata), "bench", d.hash, Vector(v))
                for d, v in zip(docs, vectors)
            ],
        )


def bench_upsert(rows: int = 1000, dim: int = 1024) -> None:
    """Both paths on the real indexed table (HNSW maintenance included) and on an unindexed copy."""
    rng = random.Random(3)
    vectors = [[rng.uniform(-1, 1) for _ in range(dim)] for _ in range(rows)]
    with get_pool().connection() as conn:
        with_vectors(conn)
        conn.execute("drop table if exists bench_vectors")
        conn.execute("create table bench_vectors (like code_vectors including defaults including constraints)")
        conn.execute("alter table bench_vectors add unique (source_id, chunk_index)")
        try:
            # a first pass warms the index and the buffers; it is not counted
            for table, label in (("code_vectors", None), ("code_vectors", "hnsw"), ("bench_vectors", "noindex")):
                figures = {}
                for path in ("copy", "executemany"):
                    run = uuid.uuid4().hex[:8]
                    docs = [Doc(f"upsert-{run}-{i}", 0, f"text {i}") for i in range(rows)]
                    t = time.perf_counter()
                    for start in range(0, rows, 250):
                        chunk = slice(start, start + 250)
                        if path == "copy":
                            upsert_vectors(conn, table, docs[chunk], vectors[chunk], "bench", dim)
                        else:
                            executemany_upsert(conn, table, docs[chunk], vectors[chunk])
                    figures[path] = rows / (time.perf_counter() - t)
                    conn.execute(f"delete from {table} where source_id like %s", (f"upsert-{run}-%",))
                if label is not None:
                    print(f"upsert_copy_{label}_rows_per_s: {figures['copy']:.0f}")
                    print(f"upsert_executemany_{label}_rows_per_s: {figures['executemany']:.0f}")
        finally:
            conn.execute("drop table if exists bench_vectors")


def main() -> None:
    from fleet.shared.logs import configure_logging

    configure_logging("WARNING")
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["docs", "upsert"])
    a = p.parse_args()
    bench_docs() if a.what == "docs" else bench_upsert()


if __name__ == "__main__":
    main()
