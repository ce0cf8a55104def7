"""Embedding jobs across worker processes: a kill mid-job and a rate limit shared by two processes.
No other embed workers run in this module, so these processes alone take the jobs."""

from __future__ import annotations

import uuid

import httpx
import pytest

from .conftest import make_client, worker_env
from .embedding_support import docs, embed_env, sim_log, stored
from .helpers import WorkerGroup, dead_letters, events, wait_for

pytestmark = pytest.mark.usefixtures("fresh_sim")  # every test starts with a clean simulator


def test_worker_killed_mid_job_reembeds_only_unfinished_batches(services, sim, tmp_path):
    httpx.post(f"{sim.url}/_sim/config", json={"latency_ms": 700})
    env = worker_env(services, "pgmq", **embed_env(sim, EMBED_MAX_BATCH="2"))
    client = make_client("pgmq")
    prefix = f"kill-{uuid.uuid4().hex[:8]}"
    trace = str(uuid.uuid4())
    group = WorkerGroup(env, threads=2, log_dir=tmp_path).start()
    try:
        client.enqueue("embed_documents", {"documents": docs(prefix, 10)}, trace_id=trace)
        wait_for(
            lambda: len([e for e in events(services["dsn"], trace_id=trace) if e["type"] == "embed.status"]) >= 2,
            30,
            what="two finished batches",
        )
        group.kill()
        finished_before = len(stored(services["dsn"], prefix))
        second = WorkerGroup(env, threads=2, log_dir=tmp_path).start()
        try:
            wait_for(lambda: len(stored(services["dsn"], prefix)) == 10, 40, what="all ten documents")
            wait_for(
                lambda: [e for e in events(services["dsn"], trace_id=trace) if e["type"] == "job.succeeded"],
                60,
                what="the job to succeed",
            )
        finally:
            assert second.terminate() == 0
    finally:
        group.kill()
        client.broker.close()
    assert finished_before >= 4
    embedded_inputs = [i for r in sim_log(sim) if r["status"] == 200 for i in r["inputs"] if i.startswith(prefix)]
    # finished batches are not paid for again; at most the batch in flight at the kill is repeated
    assert len(embedded_inputs) <= 10 + 2
    assert len(set(embedded_inputs)) == 10


@pytest.mark.parametrize("kind", ["pgmq", "redis"])
def test_rate_limit_holds_across_two_worker_processes(services, sim, tmp_path, kind):
    env = worker_env(services, kind, **embed_env(sim, EMBED_RATE_LIMIT_PER_MIN="5"))
    client = make_client(kind)
    prefix = f"rl-{kind}-{uuid.uuid4().hex[:8]}"
    trace = str(uuid.uuid4())
    group = WorkerGroup(env, processes=2, threads=4, log_dir=tmp_path).start()
    try:
        client.enqueue_many(
            "embed_documents", [{"documents": docs(f"{prefix}-{j}", 1)} for j in range(12)], trace_id=trace
        )
        wait_for(
            lambda: len([e for e in events(services["dsn"], trace_id=trace) if e["type"] == "job.deferred"]) >= 7,
            30,
            what="the jobs over the limit to be deferred",
        )
        evs = wait_for(
            lambda: (
                (e := events(services["dsn"], trace_id=trace))
                and len({x["job_id"] for x in e if x["type"] == "job.succeeded"}) >= 5
                and e
            ),
            30,
            what="the jobs within the limit",
        )
        calls = [r for r in sim_log(sim) if any(i.startswith(prefix) for i in r["inputs"])]
        assert len(calls) == 5  # 5 a minute, whichever of the two processes asks
        succeeded = {e["job_id"] for e in evs if e["type"] == "job.succeeded"}
        assert len(succeeded) == 5
        # each call names its job, attempt and delivery (X-Request-Id), as the provider's request log shows
        assert {c["request_id"].split("/")[0] for c in calls} == succeeded, [c["request_id"] for c in calls]
        assert all(c["request_id"].split("/")[1] == "1" and c["request_id"].split("/")[2] != "-" for c in calls)
        assert not dead_letters(services["dsn"], trace)  # deferred, not failed
        deferred = [e for e in evs if e["type"] == "job.deferred"]
        assert all(e["payload"]["error_class"] == "RateLimitExceeded" for e in deferred)
    finally:
        assert group.terminate() == 0
        client.broker.flush("embed")  # the deferred jobs would wait out the minute
        client.broker.close()


def test_chat_rate_limit_holds_across_two_worker_processes(services, sim, tmp_path):
    """CHAT_RATE_LIMIT_PER_MIN uses the same shared limiter: 3 provider calls a minute, the rest deferred."""
    from .embedding_support import API_KEY

    env = worker_env(services, "pgmq", CHAT_API_BASE=f"{sim.url}/v1", CHAT_API_KEY=API_KEY, CHAT_RATE_LIMIT_PER_MIN="3")
    client = make_client("pgmq")
    trace = str(uuid.uuid4())
    group = WorkerGroup(env, processes=2, threads=4, log_dir=tmp_path).start()
    try:
        client.enqueue_many(
            "chat_completion",
            [{"session_id": f"rl-{uuid.uuid4()}", "content": f"q {i}"} for i in range(7)],
            trace_id=trace,
        )
        wait_for(
            lambda: len([e for e in events(services["dsn"], trace_id=trace) if e["type"] == "job.deferred"]) >= 4,
            30,
            what="the chats over the limit to be deferred",
        )
        wait_for(
            lambda: len([e for e in events(services["dsn"], trace_id=trace) if e["type"] == "chat.done"]) >= 3,
            30,
            what="the chats within the limit",
        )
        calls = [r for r in sim_log(sim) if r["path"] == "/v1/chat/completions"]
        assert len(calls) == 3
        assert len([e for e in events(services["dsn"], trace_id=trace) if e["type"] == "chat.done"]) == 3
        assert not dead_letters(services["dsn"], trace)
    finally:
        assert group.terminate() == 0
        client.broker.flush("chat")
        client.broker.close()
