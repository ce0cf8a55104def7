"""Many producers, one job each (a web app enqueueing one job per request).

    python -m bench.producers --threads 8 --jobs-per-thread 500 [--rounds 3]

N threads each enqueue jobs one at a time, each in its own transaction:
- sdk:          FleetClient.enqueue("echo", ...) on the pgmq broker (the SDK's pool, the queue's NOTIFY trigger)
- raw:          `select pgmq.send('echo', ...)` on the same queue, one connection per thread, autocommit
- raw_nonotify: the same on a queue without the fleet's statement-level NOTIFY trigger, to see whether
                that trigger serialises commits (every NOTIFY takes one lock at commit, database-wide)
Rounds are interleaved; each figure is the median round. Prints throughput and p50/p99 enqueue latency.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import psycopg

from fleet.shared.db import database_dsn

QUEUE = "echo"
PLAIN_QUEUE = "bench_send_plain"  # pgmq.create only: no fleet trigger


def run_threads(threads: int, per_thread: int, make_sender) -> tuple[float, list[float]]:
    """(jobs/s, every enqueue's latency in ms) for `threads` threads each sending `per_thread` jobs."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def producer(i: int) -> None:
        try:
            send, close = make_sender()
            try:
                start.wait()
                mine = latencies[i]
                for n in range(per_thread):
                    t = time.perf_counter()
                    send({"message": f"p{i} {n}"})
                    mine.append((time.perf_counter() - t) * 1000)
            finally:
                close()
        except BaseException as e:  # reported by the main thread
            errors.append(e)
            start.abort()

    pool = [threading.Thread(target=producer, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return threads * per_thread / elapsed, [x for mine in latencies for x in mine]


def raw_sender(queue: str):
    def make():
        conn = psycopg.connect(database_dsn(), autocommit=True)
        body = {
            "queue_name": QUEUE,
            "actor_name": "echo",
            "args": [],
            "kwargs": {},
            "options": {},
            "message_id": "x",
            "message_timestamp": 0,
        }

        def send(payload):
            body["args"] = [payload]
            conn.execute("select pgmq.send(%s, %s::jsonb)", (queue, json.dumps(body)))

        return send, conn.close

    return make


def sdk_sender(client):
    def make():
        return (lambda payload: client.enqueue("echo", payload)), (lambda: None)

    return make


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def main() -> None:
    from fleet.shared.client import FleetClient
    from fleet.shared.db import size_pool_for_threads
    from fleet.shared.logs import configure_logging

    configure_logging("WARNING")
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--jobs-per-thread", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    size_pool_for_threads(a.threads)
    client = FleetClient()
    client.enqueue("echo", {"message": "warm-up"})
    with psycopg.connect(database_dsn(), autocommit=True) as conn:
        if not conn.execute("select 1 from pgmq.meta where queue_name = %s", (PLAIN_QUEUE,)).fetchone():
            conn.execute("select pgmq.create(%s)", (PLAIN_QUEUE,))
    kinds = {"sdk": sdk_sender(client), "raw": raw_sender(QUEUE), "raw_nonotify": raw_sender(PLAIN_QUEUE)}
    rounds: dict[str, list[tuple[float, list[float]]]] = {k: [] for k in kinds}
    for _ in range(a.rounds):
        for kind, make in kinds.items():
            rounds[kind].append(run_threads(a.threads, a.jobs_per_thread, make))
            with psycopg.connect(database_dsn(), autocommit=True) as conn:  # the next round starts empty
                conn.execute("select pgmq.purge_queue(%s)", (QUEUE,))
                conn.execute("select pgmq.purge_queue(%s)", (PLAIN_QUEUE,))
    client.broker.close()
    for kind, results in rounds.items():
        rate, latencies = sorted(results, key=lambda r: r[0])[len(results) // 2]  # the median round
        prefix = f"producers{a.threads}_{kind}"
        print(f"{prefix}_jobs_per_s: {rate:.0f}")
        print(f"{prefix}_p50_ms: {statistics.median(latencies):.2f}")
        print(f"{prefix}_p99_ms: {percentile(latencies, 0.99):.2f}")


if __name__ == "__main__":
    main()
