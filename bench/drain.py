"""One measurement per process run, printed as `name: value` lines (bench/run.py collects them).

python -m bench.drain drain --broker pgmq|pgmq-fleet|redis|stub --jobs N
python -m bench.drain raw-pgmq --jobs N
python -m bench.drain enqueue --jobs N
python -m bench.drain pickup --samples N
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

import dramatiq
import psycopg
from dramatiq import Worker

from fleet.shared.config import get_settings
from fleet.shared.db import database_dsn, redis_url

QUEUE = "bench_noop"
THREADS = int(os.environ.get("BENCH_THREADS", "8"))  # one process x 8 threads, as the targets say


def fresh_queue(dsn: str, name: str = QUEUE) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("select pgmq.drop_queue(%s)", (name,)) if conn.execute(
            "select 1 from pgmq.meta where queue_name = %s", (name,)
        ).fetchone() else None
        conn.execute("select pgmq.create(%s)", (name,))


def make_broker(kind: str) -> dramatiq.Broker:
    """stub, redis, pgmq: the library's broker with dramatiq's default middleware, as stock brokers get;
    pgmq-fleet, redis-fleet: the fleet's broker as `fleet worker` builds it, every middleware on."""
    from dramatiq.brokers.redis import RedisBroker
    from dramatiq.brokers.stub import StubBroker

    from fleet.shared.brokers import build_broker
    from fleet.shared.brokers.pgmq import PgmqBroker

    settings = get_settings()
    if kind == "stub":
        return StubBroker()
    if kind.startswith("redis"):
        broker = (
            RedisBroker(url=redis_url(settings))
            if kind == "redis"
            else build_broker(settings.model_copy(update={"broker": "redis"}))
        )
        broker.flush_all()
        return broker
    fresh_queue(database_dsn(settings))
    if kind == "pgmq":
        return PgmqBroker(settings=settings)
    return build_broker(settings.model_copy(update={"broker": "pgmq"}))


def drain(kind: str, jobs: int) -> None:
    """Enqueue `jobs` no-op jobs, then time one worker process (THREADS threads) running them all, until
    the broker has them acknowledged. The PostgreSQL server's CPU over enqueue and drain is read too."""
    from bench.dbcpu import ServerCpu

    broker = make_broker(kind)
    dramatiq.set_broker(broker)
    done = threading.Semaphore(0)

    @dramatiq.actor(queue_name=QUEUE, actor_name="noop", max_retries=0)
    def noop(payload=None):
        done.release()

    messages = [noop.message({"i": i}) for i in range(jobs)]
    with ServerCpu(database_dsn()) as db_cpu:
        t = time.perf_counter()
        if hasattr(broker, "enqueue_many"):
            broker.enqueue_many(messages)
        else:
            for m in messages:
                broker.enqueue(m)
        enqueue_s = time.perf_counter() - t
        worker = Worker(broker, queues={QUEUE}, worker_threads=THREADS, worker_timeout=100)
        t = time.perf_counter()
        worker.start()
        for _ in range(jobs):
            if not done.acquire(timeout=120):
                raise SystemExit(f"drain {kind}: stalled")
        wait_acknowledged(kind, broker)
        elapsed = time.perf_counter() - t
    worker.stop()
    broker.close()
    name = kind.replace("-", "_")
    print(f"drain_{name}_jobs_per_s: {jobs / elapsed:.0f}")
    print(f"drain_{name}_enqueue_jobs_per_s: {jobs / enqueue_s:.0f}")
    if db_cpu.seconds is not None and kind != "stub":
        print(f"drain_{name}_db_cpu_ms_per_1k: {db_cpu.per_1k_ms(jobs):.1f}")


def wait_acknowledged(kind: str, broker) -> None:
    """Until every message is acknowledged in the broker (pgmq: deleted; Redis: gone from the queue's hash)."""
    if kind.startswith("pgmq"):
        while broker.pending(QUEUE):
            time.sleep(0.005)
    elif kind.startswith("redis"):
        while broker.client.hlen(f"{broker.namespace}:{QUEUE}.msgs"):
            time.sleep(0.005)


def raw_pgmq(jobs: int) -> None:
    dsn = database_dsn()
    fresh_queue(dsn, "bench_raw")
    body = json.dumps(
        {
            "queue_name": QUEUE,
            "actor_name": "noop",
            "args": [{"i": 0}],
            "kwargs": {},
            "options": {},
            "message_id": "x",
            "message_timestamp": 0,
        }
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        for start in range(0, jobs, 1000):
            conn.execute("select pgmq.send_batch('bench_raw', %s::jsonb[])", ([body] * min(1000, jobs - start),))
        t = time.perf_counter()
        n = 0
        while True:
            ids = [r[0] for r in conn.execute("select msg_id from pgmq.read('bench_raw', 30, 100)")]
            if not ids:
                break
            conn.execute("select pgmq.delete('bench_raw', %s::bigint[])", (ids,))
            n += len(ids)
        elapsed = time.perf_counter() - t
    print(f"raw_pgmq_read100_delete_loop_per_s: {n / elapsed:.0f}")


def enqueue(jobs: int, rounds: int = 3) -> None:
    """SDK enqueue_many (one transaction) against raw send_batch of the same envelopes in one transaction,
    interleaved; the median round of each."""
    from fleet.shared.client import FleetClient

    dsn = database_dsn()
    payloads = [{"message": f"job {i}"} for i in range(jobs)]
    client = FleetClient()
    client.enqueue("echo", {"message": "warm-up"})
    bodies = [m.encode().decode() for m in (client.message("echo", p, None) for p in payloads)]
    sdk, raw = [], []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(rounds):
            conn.execute("select pgmq.purge_queue('echo')")
            t = time.perf_counter()
            client.enqueue_many("echo", payloads)
            sdk.append(jobs / (time.perf_counter() - t))
            conn.execute("select pgmq.purge_queue('echo')")
            t = time.perf_counter()
            with conn.transaction():  # atomic like the SDK's: one commit for the whole batch
                for start in range(0, jobs, 1000):  # the fastest raw form: one JSON array per send_batch
                    conn.execute(
                        "select pgmq.send_batch('echo', array(select jsonb_array_elements(%s::jsonb)))",
                        ("[" + ",".join(bodies[start : start + 1000]) + "]",),
                    )
            raw.append(jobs / (time.perf_counter() - t))
        conn.execute("select pgmq.purge_queue('echo')")
    client.broker.close()
    print(f"enqueue_sdk_jobs_per_s: {statistics.median(sdk):.0f}")
    print(f"enqueue_raw_send_batch_one_transaction_per_s: {statistics.median(raw):.0f}")


def pickup(samples: int) -> None:
    broker = make_broker("pgmq-fleet")
    dramatiq.set_broker(broker)
    latencies: list[float] = []
    got = threading.Semaphore(0)

    @dramatiq.actor(queue_name=QUEUE, actor_name="noop", max_retries=0)
    def noop(payload=None):
        latencies.append(time.time() - payload["t"])
        got.release()

    worker = Worker(broker, queues={QUEUE}, worker_threads=THREADS, worker_timeout=1000)
    worker.start()
    time.sleep(1.0)  # idle: the consumer is parked on LISTEN
    for _ in range(samples):
        noop.send({"t": time.time()})
        if not got.acquire(timeout=10):
            raise SystemExit("pickup: a job was not picked up")
        time.sleep(0.02)
    worker.stop()
    broker.close()
    ms = sorted(x * 1000 for x in latencies)
    print(f"pickup_p50_ms: {statistics.median(ms):.2f}")
    print(f"pickup_p99_ms: {ms[int(len(ms) * 0.99) - 1]:.2f}")


def main() -> None:
    from fleet.shared.logs import configure_logging

    configure_logging("WARNING")
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["drain", "raw-pgmq", "enqueue", "pickup"])
    p.add_argument("--broker", default="pgmq")
    p.add_argument("--jobs", type=int, default=20000)
    p.add_argument("--samples", type=int, default=200)
    a = p.parse_args()
    if a.what == "drain":
        drain(a.broker, a.jobs)
    elif a.what == "raw-pgmq":
        raw_pgmq(a.jobs)
    elif a.what == "enqueue":
        enqueue(a.jobs)
    else:
        pickup(a.samples)


if __name__ == "__main__":
    main()
