"""`fleet demo`: embedded services, migrations, worker processes, a real mixed workload, progress, summary."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid

from fleet.shared.config import get_settings


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


def start_simulator(config: dict) -> tuple[subprocess.Popen, str]:
    """The provider simulator as its own process, for a demo or benchmark with no provider configured."""
    import json

    import httpx

    from fleet.shared.services import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fleet.simulator", "--port", str(port), "--config", json.dumps(config)],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 15
    while True:
        try:
            httpx.get(f"{url}/health", timeout=0.5)
            return proc, url
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the provider simulator did not start")
            time.sleep(0.05)


def _embed_progress(conn, trace_id: str) -> tuple[int, int, int, int]:
    """(batches done, batches planned, jobs finished, documents embedded) from bus_events."""
    row = conn.execute(
        "select count(*) filter (where type = 'embed.status'),"
        " coalesce(sum((payload->>'batches')::int) filter (where type = 'embed.done'), 0),"
        " count(*) filter (where type = 'embed.done'),"
        " coalesce(sum((payload->>'embedded')::int) filter (where type = 'embed.done'), 0)"
        " from bus_events where trace_id = %s and type in ('embed.status', 'embed.done')",
        (trace_id,),
    ).fetchone()
    return row[0], row[1], row[2], row[3]


def demo_embeddings(client, connect, documents: int, workers) -> bool:
    trace_id = str(uuid.uuid4())
    rng = random.Random(11)
    words = ("agent memory vector queue worker billing provider latency cohort template upgrade embedding "
             "retry backoff trace event postgres redis stream token batch").split()
    docs = [{"source_id": f"demo-doc-{i}", "chunk_index": 0, "metadata": {"demo": True},
             "content": " ".join(rng.choice(words) for _ in range(rng.randint(8, 60)))} for i in range(documents)]
    t0 = time.monotonic()
    jobs = client.embed_documents(docs, docs_per_job=256, trace_id=trace_id)
    print(f"  embedding {documents} documents in {len(jobs)} jobs (batches of up to 64 per provider call), trace {trace_id}")
    with connect() as conn:
        while True:
            done, planned, finished, embedded = _embed_progress(conn, trace_id)
            total = max(planned, done) if finished == len(jobs) else max(done + 1, planned, len(jobs))
            print("\r  batches " + _bar(done, total), end="", flush=True)
            if finished >= len(jobs):
                break
            if time.monotonic() - t0 > 300 or workers.poll() is not None:
                print("\nfleet demo: the embedding jobs did not finish", file=sys.stderr)
                return False
            time.sleep(0.2)
        stored = conn.execute("select count(*) from vector_documents where source_id like 'demo-doc-%%'").fetchone()[0]
    elapsed = time.monotonic() - t0
    print(f"\n    embedded {embedded} documents ({documents - embedded} unchanged, skipped) in {elapsed:.1f}s: "
          f"{documents / elapsed:,.0f} docs/s; vector_documents holds {stored} demo rows")
    return True


def demo_chats(client, questions: list[str]) -> bool:
    """A few concurrent chats, their answers streaming side by side."""
    import threading

    answers = [""] * len(questions)
    streams = []
    for q in questions:
        streams.append(client.stream_chat(f"demo-{uuid.uuid4().hex[:8]}", q, idempotency_key=str(uuid.uuid4())))

    def follow(i: int) -> None:
        for delta in streams[i]:
            answers[i] += delta

    threads = [threading.Thread(target=follow, args=(i,), daemon=True) for i in range(len(streams))]
    for t in threads:
        t.start()
    tty = sys.stdout.isatty()
    print(f"  {len(questions)} concurrent chats:")
    for q in questions:
        print(f"    > {q}")
    while any(t.is_alive() for t in threads):
        if tty:
            print(f"\033[{len(questions)}F", end="")
            for q, a in zip(questions, answers):
                print(f"\033[K    > {q}: {a[-70:]}")
        time.sleep(0.1)
    if tty:
        print(f"\033[{len(questions)}F", end="")
    for q, a, st in zip(questions, answers, streams):
        print(f"\033[K    > {q}: {a}" if tty else f"    < {a}")
        if st.status != "complete":
            print(f"    chat ended {st.status}: {st.error}", file=sys.stderr)
            return False
    usage = [s.usage or {} for s in streams]
    print(f"    tokens: {sum(u.get('prompt_tokens') or 0 for u in usage)} in, "
          f"{sum(u.get('completion_tokens') or 0 for u in usage)} out; messages stored in `messages`")
    return True


def demo_lifecycle(client, connect, memories: int = 2000) -> bool:
    """Seed memories in a demo project and run the lifecycle on them: first a dry run, then for real."""
    project = f"demo-{uuid.uuid4().hex[:6]}"
    with connect() as conn:
        conn.execute(
            "with seeded as (insert into memories (project_id, type, expires_at, last_accessed_at, confidence, pinned)"
            " select %s, (array['semantic', 'episodic'])[1 + g %% 2],"
            " case when g %% 10 = 0 then now() - interval '1 day' end,"
            " now() - (g %% 60) * interval '1 day', 0.3 + (g %% 70) / 100.0, g %% 50 = 0"
            " from generate_series(1, %s) g returning id)"
            " insert into memory_payloads (memory_id, content) select id, 'demo memory ' || id from seeded",
            (project, memories))
    print(f"  seeded {memories} memories in project {project} (10% past expiry, access spread over 60 days, 2% pinned)")
    for dry in (True, False):
        trace = str(uuid.uuid4())
        client.enqueue("memory_lifecycle", {"project_id": project, "dry_run": dry}, trace_id=trace)
        deadline = time.monotonic() + 120
        with connect() as conn:
            while (row := conn.execute("select payload from bus_events where trace_id = %s and type = 'lifecycle.done'",
                                       (trace,)).fetchone()) is None:
                if time.monotonic() > deadline:
                    print("fleet demo: the lifecycle run did not finish", file=sys.stderr)
                    return False
                time.sleep(0.2)
        from fleet.shared.lifecycle import ACTIONS

        counts = ", ".join(f"{a} {row[0]['counts'].get(a, 0)}" for a in ACTIONS)
        print(f"    {'dry run' if dry else 'run    '}: {counts} ({row[0]['duration_ms']:.0f} ms)")
    return True


DEMO_TEMPLATE = {
    "agents": [{"name": "concierge", "system": "You are the fleet's concierge.",
                "llm_config": {"model": "meta-llama/Meta-Llama-3.1-8B-Instruct", "model_endpoint_type": "openai",
                               "model_endpoint": "https://provider.invalid/v1", "context_window": 8192},
                "embedding_config": {"embedding_endpoint_type": "openai", "embedding_model": "BAAI/bge-m3",
                                     "embedding_endpoint": "https://provider.invalid/v1", "embedding_dim": 1024},
                "block_ids": ["persona", "human"], "tool_ids": ["send"], "tags": ["demo"]}],
    "blocks": [{"id": "persona", "label": "persona", "value": "Helpful and brief.", "limit": 2000},
               {"id": "human", "label": "human", "value": "", "limit": 2000}],
    "tools": [{"id": "send", "name": "send_message"}],
}


def _wait_run(connect, run_id: str, label: str) -> dict | None:
    deadline = time.monotonic() + 300
    with connect() as conn:
        while time.monotonic() < deadline:
            total, done, status, finished = conn.execute(
                "select coalesce((r.counts->>'total')::int, 0),"
                " (select count(*) from agent_upgrades u where u.run_id = r.id"
                "  and u.status in ('succeeded', 'failed', 'skipped', 'cancelled')), r.status, r.finished_at is not null"
                " from upgrade_runs r where r.id = %s", (run_id,)).fetchone()
            print(f"\r    {label:<8}" + _bar(done, max(total, 1)), end="", flush=True)
            if finished:
                print()
                return dict(conn.execute("select status, count(*) from agent_upgrades where run_id = %s group by status",
                                         (run_id,)).fetchall())
            time.sleep(0.2)
    print()
    return None


def demo_upgrades(client, connect, agents: int = 200) -> bool:
    import copy

    from fleet.shared.templates import publish

    name = f"concierge-{uuid.uuid4().hex[:6]}"
    publish(name, "1.0.0", DEMO_TEMPLATE)
    newer = copy.deepcopy(DEMO_TEMPLATE)
    newer["agents"][0]["system"] = "You are the fleet's concierge. Answer in two sentences."
    newer["agents"][0]["llm_config"]["context_window"] = 16384
    publish(name, "1.1.0", newer)
    users = [str(uuid.uuid4()) for _ in range(agents)]
    trace = str(uuid.uuid4())
    client.enqueue_many("create_agent", [{"user_id": u, "template": name, "version": "1.0.0"} for u in users],
                        trace_id=trace)
    with connect() as conn:
        deadline = time.monotonic() + 120
        while conn.execute("select count(*) from user_profiles where template_name = %s", (name,)).fetchone()[0] < agents:
            if time.monotonic() > deadline:
                print("fleet demo: the agents were not created in time", file=sys.stderr)
                return False
            time.sleep(0.2)
    print(f"  published {name} 1.0.0 and 1.1.0, created {agents} agents on the Letta simulator (billing proxy forced)")
    for dry in (True, False):
        with connect() as conn:
            run = str(conn.execute("select ams_enqueue_upgrade(%s, '1.1.0', '{}'::jsonb, %s)", (name, dry)).fetchone()[0])
        counts = _wait_run(connect, run, "dry run" if dry else "apply")
        if counts is None:
            print("fleet demo: the upgrade run did not finish", file=sys.stderr)
            return False
        print(f"      {', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}")
    return True


def run_demo(*, jobs: int = 5000, processes: int = 2, threads: int = 8, keep_services: bool = False,
             documents: int = 3000, chats: int = 3) -> int:
    from fleet.shared.cli import worker_command, worker_env
    from fleet.shared.client import FleetClient
    from fleet.shared.db import connect
    from fleet.shared.migrate import migrate
    from fleet.shared.services import EmbeddedPostgres, EmbeddedRedis, free_port

    settings = get_settings()
    started_pg = settings.database_url is None and not EmbeddedPostgres(settings.home).running()
    started_redis = settings.broker == "redis" and settings.redis_url is None and not EmbeddedRedis(settings.home).running()
    print(f"fleet demo: broker={settings.broker}, {jobs} jobs, {processes} worker process(es) x {threads} threads")
    t0 = time.monotonic()
    with connect() as conn:
        migrate(conn)
    print(f"  services up and migrated in {time.monotonic() - t0:.1f}s")

    simulator = None
    metrics_port = free_port()
    env = worker_env(None, metrics_port)
    env.setdefault("ZUPLO_BASE_URL", "https://billing.demo.invalid")  # the agents queue refuses to start without it
    if settings.embedding_api_key is None or settings.chat_key is None or not settings.letta_api_base_url:
        simulator, sim_url = start_simulator({"latency_ms": 40, "latency_per_input_ms": 0.5, "ttft_ms": 300,
                                              "tokens_per_s": 25, "answer_tokens": 30})
        for var in (["EMBEDDING_API_BASE"] if settings.embedding_api_key is None else []) + (
                ["CHAT_API_BASE"] if settings.chat_key is None else []):
            env[var] = os.environ[var] = f"{sim_url}/v1"
        if not settings.letta_api_base_url:
            env["LETTA_API_BASE_URL"] = os.environ["LETTA_API_BASE_URL"] = sim_url
        print(f"  no provider keys: using the provider simulator at {sim_url}")
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
        print("    chat     fleet gateway, then open http://127.0.0.1:8080/ (chat and embed over HTTP as SSE)")
        if documents and not demo_embeddings(client, connect, documents, workers):
            return 1
        from fleet.shared.config import reset_settings

        reset_settings()  # the chat client reads CHAT_API_BASE
        if chats and not demo_chats(FleetClient(), ["What is the fleet?", "How do retries work?",
                                                    "Where are answers stored?"][:chats]):
            return 1
        if not demo_lifecycle(FleetClient(), connect):
            return 1
        if not demo_upgrades(FleetClient(), connect):
            return 1
        return 0
    finally:
        stop_process(workers)
        if simulator is not None:
            stop_process(simulator, 5)
        if not keep_services:
            if started_redis:
                EmbeddedRedis(settings.home).down()
            if started_pg:
                EmbeddedPostgres(settings.home).down()
            print("  stopped the workers and the services this demo started")
        else:
            print("  stopped the workers; services left running (fleet services down)")
