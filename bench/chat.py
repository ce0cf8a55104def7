"""Chat benchmarks, printed as `name: value` lines.

python -m bench.chat latency    the fleet's added latency: time to the first delta at a listener
                                minus the simulator's time to first token, idle, p50 and p99
python -m bench.chat throughput chats/s through real worker processes with the simulator at a
                                fixed latency, against the simulator's rate measured directly
                                (8 streaming clients, no fleet) in the same run
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
import uuid

import psycopg

from fleet.shared.db import database_dsn

TTFT_S = 0.2
THREADS = 8


def start(config: dict):
    from fleet.ops.processes import start_simulator, worker_command, worker_env
    from fleet.shared.config import reset_settings

    sim, url = start_simulator(config)
    env = worker_env(["chat"], 0) | {"CHAT_API_BASE": f"{url}/v1", "CHAT_KEEPALIVE_S": "5"}
    os.environ["CHAT_API_BASE"] = env["CHAT_API_BASE"]
    reset_settings()
    workers = subprocess.Popen(
        worker_command(["chat"], 1, THREADS, 0),
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return sim, workers


def latency(samples: int = 60) -> None:
    from fleet.ops.processes import stop_process
    from fleet.shared.client import FleetClient

    sim, workers = start({"ttft_ms": TTFT_S * 1000, "answer_tokens": 3})
    client = FleetClient()
    added = []
    try:
        client.chat(f"bench-{uuid.uuid4()}", "warm up", timeout_s=60)
        for i in range(samples):
            t = time.perf_counter()
            stream = client.stream_chat(f"bench-{uuid.uuid4()}", f"question {i}", timeout_s=60)
            first = None
            for _ in stream:
                if first is None:
                    first = time.perf_counter()
            if stream.status != "complete" or first is None:
                raise SystemExit(f"chat latency benchmark: a chat ended {stream.status}")
            added.append((first - t - TTFT_S) * 1000)
            time.sleep(0.05)
    finally:
        stop_process(workers)
        stop_process(sim, 5)
        client.broker.close()
    added.sort()
    print(f"chat_added_latency_p50_ms: {statistics.median(added):.1f}")
    print(f"chat_added_latency_p99_ms: {added[max(0, int(len(added) * 0.99) - 1)]:.1f}")


def throughput(chats: int = 64) -> None:
    from bench.provider import direct_rate
    from fleet.ops.processes import stop_process
    from fleet.shared.client import FleetClient
    from fleet.shared.config import get_settings

    sim, workers = start({"ttft_ms": 500, "tokens_per_s": 20, "answer_tokens": 11})
    client = FleetClient()
    dsn = database_dsn()
    try:
        client.chat(f"bench-{uuid.uuid4()}", "warm up", timeout_s=60)
        trace = str(uuid.uuid4())
        t = time.perf_counter()
        client.enqueue_many(
            "chat_completion",
            [{"session_id": f"bench-{uuid.uuid4()}", "content": f"q {i}"} for i in range(chats)],
            trace_id=trace,
        )
        with psycopg.connect(dsn, autocommit=True) as conn:
            while (
                conn.execute(
                    "select count(*) from bus_events where trace_id = %s and type in ('chat.done', 'job.dead')",
                    (trace,),
                ).fetchone()[0]
                < chats
            ):
                time.sleep(0.02)
        elapsed = time.perf_counter() - t
        body = {
            "model": get_settings().chat_model_default,
            "stream": True,
            "messages": [{"role": "user", "content": "q"}],
        }
        provider = direct_rate(
            f"{os.environ['CHAT_API_BASE']}/chat/completions", [body] * chats, THREADS, units_per_request=1
        )
    finally:
        stop_process(workers)
        stop_process(sim, 5)
        client.broker.close()
    print(f"chat_per_s: {chats / elapsed:.2f}")
    print(f"chat_provider_direct_per_s: {provider:.2f}")


def main() -> None:
    from fleet.shared.logs import configure_logging

    configure_logging("WARNING")
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["latency", "throughput"])
    a = p.parse_args()
    latency() if a.what == "latency" else throughput()


if __name__ == "__main__":
    main()
