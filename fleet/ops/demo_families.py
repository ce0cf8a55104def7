"""The families' part of `fleet demo`: documents embedded, concurrent chats, a memory lifecycle run and an
agent upgrade, each on the running workers, each with its progress."""

from __future__ import annotations

import copy
import functools
import random
import sys
import time
import uuid
from typing import Any

from fleet.ops import queries
from fleet.ops.follow import follow_upgrade_run, wait_until
from fleet.ops.terminal import progress_bar

DEMO_TEMPLATE: dict[str, Any] = {
    "agents": [
        {
            "name": "concierge",
            "system": "You are the fleet's concierge.",
            "llm_config": {
                "model": "meta-llama/Meta-Llama-3.1-8B-Instruct",
                "model_endpoint_type": "openai",
                "model_endpoint": "https://provider.invalid/v1",
                "context_window": 8192,
            },
            "embedding_config": {
                "embedding_endpoint_type": "openai",
                "embedding_model": "BAAI/bge-m3",
                "embedding_endpoint": "https://provider.invalid/v1",
                "embedding_dim": 1024,
            },
            "block_ids": ["persona", "human"],
            "tool_ids": ["send"],
            "tags": ["demo"],
        }
    ],
    "blocks": [
        {"id": "persona", "label": "persona", "value": "Helpful and brief.", "limit": 2000},
        {"id": "human", "label": "human", "value": "", "limit": 2000},
    ],
    "tools": [{"id": "send", "name": "send_message"}],
}


def demo_embeddings(client, documents: int, workers) -> bool:
    """Documents embedded by the embed workers; the bar counts documents, a total known before it starts."""
    trace_id = str(uuid.uuid4())
    rng = random.Random(11)
    words = (
        "agent memory vector queue worker billing provider latency cohort template upgrade embedding "
        "retry backoff trace event postgres redis stream token batch"
    ).split()
    docs = [
        {
            "source_id": f"demo-doc-{i}",
            "chunk_index": 0,
            "metadata": {"demo": True},
            "content": " ".join(rng.choice(words) for _ in range(rng.randint(8, 60))),
        }
        for i in range(documents)
    ]
    t0 = time.monotonic()
    jobs = client.embed_documents(docs, docs_per_job=256, trace_id=trace_id)
    print(
        f"  embedding {documents} documents in {len(jobs)} jobs (batches of up to 64 per provider call), trace "
        f"{trace_id}"
    )
    with progress_bar("documents", documents) as bar:
        while True:
            handled, finished, embedded = queries.embed_progress(trace_id)
            bar.update(handled)
            if finished >= len(jobs):
                break
            if time.monotonic() - t0 > 300 or workers.poll() is not None:
                print("fleet demo: the embedding jobs did not finish", file=sys.stderr)
                return False
            time.sleep(0.2)
    elapsed = time.monotonic() - t0
    print(
        f"    embedded {embedded} documents ({documents - embedded} unchanged, skipped) in {elapsed:.1f}s: "
        f"{documents / elapsed:,.0f} docs/s; vector_documents holds {queries.stored_documents('demo-doc-')} demo rows"
    )
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
            for q, a in zip(questions, answers, strict=True):
                print(f"\033[K    > {q}: {a[-70:]}")
        time.sleep(0.1)
    if tty:
        print(f"\033[{len(questions)}F", end="")
    for q, a, st in zip(questions, answers, streams, strict=True):
        print(f"\033[K    > {q}: {a}" if tty else f"    < {a}")
        if st.status != "complete":
            print(f"    chat ended {st.status}: {st.error}", file=sys.stderr)
            return False
    usage = [s.usage or {} for s in streams]
    print(
        f"    tokens: {sum(u.get('prompt_tokens') or 0 for u in usage)} in, "
        f"{sum(u.get('completion_tokens') or 0 for u in usage)} out; messages stored in `messages`"
    )
    return True


def demo_lifecycle(client, memories: int = 2000) -> bool:
    """Seed memories in a demo project and run the lifecycle on them: first a dry run, then for real."""
    from fleet.workers.lifecycle.actions import ACTIONS

    project = f"demo-{uuid.uuid4().hex[:6]}"
    queries.seed_memories(project, memories)
    print(f"  seeded {memories} memories in project {project} (10% past expiry, access spread over 60 days, 2% pinned)")
    for dry in (True, False):
        trace = str(uuid.uuid4())
        client.enqueue("memory_lifecycle", {"project_id": project, "dry_run": dry}, trace_id=trace)
        result = wait_until(functools.partial(queries.lifecycle_result, trace), 120)
        if result is None:
            print("fleet demo: the lifecycle run did not finish", file=sys.stderr)
            return False
        counts = ", ".join(f"{a} {result['counts'].get(a, 0)}" for a in ACTIONS)
        print(f"    {'dry run' if dry else 'run    '}: {counts} ({result['duration_ms']:.0f} ms)")
    return True


def demo_upgrades(client, agents: int = 200) -> bool:
    """A template in two versions, agents created from the first, then a dry run and a real upgrade to the second."""
    from fleet.workers.agents.templates import publish
    from fleet.workers.agents.upgrades import start_run

    name = f"concierge-{uuid.uuid4().hex[:6]}"
    publish(name, "1.0.0", DEMO_TEMPLATE)
    newer = copy.deepcopy(DEMO_TEMPLATE)
    newer["agents"][0]["system"] = "You are the fleet's concierge. Answer in two sentences."
    newer["agents"][0]["llm_config"]["context_window"] = 16384
    publish(name, "1.1.0", newer)
    users = [str(uuid.uuid4()) for _ in range(agents)]
    client.enqueue_many(
        "create_agent",
        [{"user_id": u, "template": name, "version": "1.0.0"} for u in users],
        trace_id=str(uuid.uuid4()),
    )
    if not wait_until(lambda: queries.agents_of_template(name) >= agents, 120):
        print("fleet demo: the agents were not created in time", file=sys.stderr)
        return False
    print(f"  published {name} 1.0.0 and 1.1.0, created {agents} agents on the Letta simulator (billing proxy forced)")
    for dry in (True, False):
        run = start_run(name, "1.1.0", {}, dry, client)
        counts = follow_upgrade_run(run, "upgrade, dry run" if dry else "upgrade")
        if counts is None:
            print("fleet demo: the upgrade run did not finish", file=sys.stderr)
            return False
        print(f"      {', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}")
    return True
