"""`fleet demo`: embedded services, migrations, worker processes, a real mixed workload, progress, summary."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
import uuid
from typing import Any

from fleet.ops import queries
from fleet.ops.demo_families import demo_chats, demo_embeddings, demo_lifecycle, demo_upgrades
from fleet.ops.processes import start_simulator, stop_process, worker_command, worker_env
from fleet.ops.terminal import progress_bar
from fleet.shared.capabilities import capabilities
from fleet.shared.config import get_settings

SIMULATED = {"latency_ms": 40, "latency_per_input_ms": 0.5, "ttft_ms": 300, "tokens_per_s": 25, "answer_tokens": 30}
CHAT_QUESTIONS = ["What is the fleet?", "How do retries work?", "Where are answers stored?"]


def run_demo(
    *,
    jobs: int = 5000,
    processes: int = 2,
    threads: int = 8,
    keep_services: bool = False,
    documents: int = 3000,
    chats: int = 3,
) -> int:
    from fleet.shared.services import use_embedded

    # The demo asks for embedded services: those that DATABASE_URL / REDIS_URL do not name are started here.
    started = use_embedded(redis=capabilities().queues_in_redis)
    settings = get_settings()
    print(f"fleet demo: broker={settings.broker}, {jobs} jobs, {processes} worker process(es) x {threads} threads")
    _migrate()
    simulator = workers = None
    try:
        env, simulator = _worker_env(settings)
        workers = subprocess.Popen(
            worker_command(None, processes, threads, int(env["FLEET_METRICS_PORT"])),
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return 0 if _workload(workers, jobs, documents, chats) else 1
    finally:
        for proc, timeout in ((workers, 30), (simulator, 5)):
            if proc is not None:
                stop_process(proc, timeout)
        if keep_services:
            print("  stopped the workers; services left running (fleet services down)")
        else:
            for service in reversed(started):
                service.down()
            print("  stopped the workers and the services this demo started")


def _migrate() -> None:
    from fleet.shared.db import connect
    from fleet.shared.migrate import migrate

    t0 = time.monotonic()
    with connect() as conn:
        migrate(conn)
    print(f"  services up and migrated in {time.monotonic() - t0:.1f}s")


def _worker_env(settings) -> tuple[dict[str, str], subprocess.Popen | None]:
    """The workers' environment; the provider simulator stands in for every provider without a key."""
    from fleet.shared.services import free_port

    env = worker_env(None, free_port())
    env.setdefault("ZUPLO_BASE_URL", "https://billing.demo.invalid")  # the agents queue refuses to start without it
    if settings.embedding_api_key is not None and settings.chat_key is not None and settings.letta_api_base_url:
        return env, None
    simulator, sim_url = start_simulator(SIMULATED)
    simulated = (["EMBEDDING_API_BASE"] if settings.embedding_api_key is None else []) + (
        ["CHAT_API_BASE"] if settings.chat_key is None else []
    )
    for var in simulated:
        env[var] = os.environ[var] = f"{sim_url}/v1"
    if not settings.letta_api_base_url:
        env["LETTA_API_BASE_URL"] = os.environ["LETTA_API_BASE_URL"] = sim_url
    print(f"  no provider keys: using the provider simulator at {sim_url}")
    return env, simulator


def _workload(workers: subprocess.Popen, jobs: int, documents: int, chats: int) -> bool:
    from fleet.shared.client import FleetClient
    from fleet.shared.config import reset_settings

    client = FleetClient()
    if not demo_echo(client, jobs, workers):
        return False
    if documents and not demo_embeddings(client, documents, workers):
        return False
    reset_settings()  # the chat client reads CHAT_API_BASE, set above for the simulator
    if chats and not demo_chats(FleetClient(), CHAT_QUESTIONS[:chats]):
        return False
    return demo_lifecycle(FleetClient()) and demo_upgrades(FleetClient())


def echo_payloads(jobs: int) -> list[dict]:
    """A mixed load: 2% fail for good (dead letters), 5% fail once (retried), 3% take a while."""
    rng = random.Random(7)
    payloads: list[dict[str, Any]] = []
    for i in range(jobs):
        roll = rng.random()
        if roll < 0.02:
            payloads.append({"message": f"job {i}", "fail": "permanent"})
        elif roll < 0.07:
            payloads.append({"message": f"job {i}", "fail": "transient", "fail_attempts": 1})
        elif roll < 0.10:
            payloads.append({"message": f"job {i}", "sleep_ms": rng.randint(5, 50)})
        else:
            payloads.append({"message": f"job {i}"})
    return payloads


def demo_echo(client, jobs: int, workers: subprocess.Popen) -> bool:
    trace_id = str(uuid.uuid4())
    t_enqueue = time.monotonic()
    client.enqueue_many("echo", echo_payloads(jobs), trace_id=trace_id)
    enqueue_s = time.monotonic() - t_enqueue
    print(
        f"  enqueued {jobs} echo jobs in {enqueue_s * 1000:.0f} ms ({jobs / enqueue_s:,.0f} jobs/s), trace {trace_id}"
    )
    t_start = time.monotonic()
    deadline = t_start + max(120, jobs / 50)
    with progress_bar("echo jobs", jobs) as bar:
        while (done := _finished(counts := queries.trace_outcomes(trace_id))) < jobs:
            bar.update(done)
            if workers.poll() is not None:
                print("fleet demo: the worker processes exited early", file=sys.stderr)
                return False
            if time.monotonic() > deadline:
                print(f"fleet demo: only {done} of {jobs} jobs finished in time", file=sys.stderr)
                return False
            time.sleep(0.2)
        bar.update(done)
    _summary(counts, jobs, time.monotonic() - t_start, trace_id)
    return True


def _finished(counts: dict[str, int]) -> int:
    return counts.get("job.succeeded", 0) + counts.get("job.dead", 0)


def _summary(counts: dict[str, int], jobs: int, elapsed: float, trace_id: str) -> None:
    print("  summary:")
    print(f"    done     {counts.get('job.succeeded', 0)}")
    print(f"    retried  {counts.get('job.retrying', 0)}")
    print(f"    dead     {counts.get('job.dead', 0)}  (see: fleet dlq list --queue echo)")
    print(f"    rate     {jobs / elapsed:,.0f} jobs/s over {elapsed:.1f}s")
    print(f"    story    fleet events --trace {trace_id} | head")
    print(
        "    chat     GATEWAY_DEV=true FLEET_EMBEDDED=1 fleet gateway, then open http://127.0.0.1:8080/ (chat and "
        "embed over HTTP as SSE)"
    )
