"""The chat family against a real llama.cpp server (llama-cpp-python's, SmolLM2-135M, a 2,048-token window),
with the same worker processes and code as production."""

from __future__ import annotations

import os
import signal
import uuid

import httpx
import psycopg
import pytest

from tests.conftest import started_fleet, worker_env, make_client
from tests.helpers import WorkerGroup, dead_letters, events, wait_for
from shared.services import free_port

from .openai_servers import chat_server, start_llama  # noqa: F401  (a fixture, used by name)

STORY = "Write a long story about a dragon who learns to read."


@pytest.fixture(scope="module")
def cfleet(services, chat_server, tmp_path_factory):
    env = {"CHAT_API_BASE": chat_server.base, "HEALTH_PROVIDERS": "chat", "CHAT_KEEPALIVE_S": "1"} | chat_server.env
    with started_fleet(services, "pgmq", tmp_path_factory.mktemp("chat"), **env) as fleet:
        yield fleet


def stored(dsn: str, job_id: str) -> dict:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("select content, status, tokens_in, tokens_out, tokens_estimated, finish_reason, error"
                           " from messages where job_id = %s and role = 'assistant'", (job_id,)).fetchone()
    return dict(zip(["content", "status", "tokens_in", "tokens_out", "tokens_estimated", "finish_reason", "error"], row))


def server_prompt_tokens(server, messages: list[dict]) -> int:
    """What the server itself counts for a prompt (its non-streamed answer carries usage)."""
    body = httpx.post(f"{server.base}/chat/completions", timeout=120,
                      json={"model": server.model, "messages": messages, "max_tokens": 1}).json()
    return body["usage"]["prompt_tokens"]


def key() -> str:
    return str(uuid.uuid4())


def test_a_streamed_answer_is_stored_as_streamed_with_the_servers_count(cfleet, chat_server):
    with psycopg.connect(cfleet.dsn, autocommit=True) as conn:  # a model no longer configured, left down
        conn.execute("insert into provider_health (provider, model, kind, status, consecutive_failures)"
                     " values ('chat', 'a-model-used-last-month', 'chat', 'down', 40) on conflict do nothing")
    stream = cfleet.client.stream_chat(f"s-{uuid.uuid4()}", "hello there", max_tokens=40, idempotency_key=key())
    deltas = list(stream)
    row = stored(cfleet.dsn, stream.job_id)
    assert stream.status == row["status"] == "complete" and row["finish_reason"] in ("stop", "length")
    assert "".join(deltas) == stream.text == row["content"] and row["content"]
    assert [f["type"] for f in stream.frames].count("ready") == 1
    truth = server_prompt_tokens(chat_server, [{"role": "user", "content": "hello there"}])
    if row["tokens_estimated"]:  # llama.cpp never sends the usage chunk: its tokenizer and the template count
        assert abs(row["tokens_in"] - truth) <= 2, (row["tokens_in"], truth)
    else:
        assert row["tokens_in"] == truth
    assert 0 < row["tokens_out"] <= 41


def test_a_stream_cut_by_the_server_is_stored_partial(cfleet):
    """llama.cpp ends a running stream with [DONE] and no finish_reason when another request comes."""
    first = cfleet.client.stream_chat(f"s-{uuid.uuid4()}", STORY, max_tokens=400, idempotency_key=key())
    deltas = iter(first)
    received = [next(deltas)]
    second = cfleet.client.chat(f"s-{uuid.uuid4()}", "Say hello.", max_tokens=10, idempotency_key=key())
    received += list(deltas)
    row = stored(cfleet.dsn, first.job_id)
    assert second.status == "complete"
    assert first.status == row["status"] == "partial" and row["finish_reason"] is None
    assert "without a finish_reason" in row["error"] and row["content"] == "".join(received)


@pytest.mark.timeout(900)
def test_a_session_longer_than_the_context_window_keeps_answering(cfleet):
    session = f"s-{uuid.uuid4()}"
    turn = "The quick brown fox jumps over the lazy dog. " * 60  # about 600 tokens a turn
    for n in range(4):  # 4 turns and their answers are past 2,048 tokens
        stream = cfleet.client.chat(session, f"Turn {n}. {turn}", max_tokens=20, idempotency_key=key(),
                                    timeout_s=300)
        assert stream.status == "complete" and stream.text, (n, stream.error)


def test_an_empty_answer_over_the_window_is_refused_with_its_reason(cfleet):
    """Short words weigh more in the model's tokenizer than in the estimate: the prompt is sent, the server
    answers 200 and an empty stream, and the fleet says why instead of retrying."""
    stream = cfleet.client.chat(f"s-{uuid.uuid4()}", "a " * 2100, max_tokens=10, idempotency_key=key())
    assert stream.status == "error" and stream.error["error_class"] == "ContextWindowExceeded"
    (dl,) = wait_for(lambda: dead_letters(cfleet.dsn, stream.trace_id), 30, what="the dead letter")
    assert dl["attempts"] == 1 and "does not fit the context window of" in dl["reason"]


def own_server_only(chat_server):
    if chat_server.proc is None:
        pytest.skip("CHAT_API_BASE names a server of yours: it is not killed here")


def test_a_killed_server_leaves_a_partial_answer_and_an_outage_defers_chats(services, chat_server, cache, tmp_path):
    """A server SIGKILLed mid-stream: the answer so far is stored `partial`. While it stays down, a new
    chat's failed calls mark it down and the chat is deferred (not dead-lettered, one `ready` frame); once
    the server is back, a worker's probe finds it and the chat completes."""
    own_server_only(chat_server)
    port = free_port()
    server = start_llama(cache, tmp_path, port)
    env = worker_env(services, "pgmq", CHAT_API_BASE=server.base, HEALTH_PROVIDERS="chat", HEALTH_DOWN_AFTER="3",
                     CHAT_PROVIDER_MAX_RETRIES="2", HEALTH_RECHECK_S="2", FLEET_MAX_RETRIES="2",
                     **server.env)
    client = make_client("pgmq")
    group = WorkerGroup(env, threads=2, log_dir=tmp_path).start()
    try:
        stream = client.stream_chat(f"s-{uuid.uuid4()}", STORY, max_tokens=400, idempotency_key=key())
        deltas = iter(stream)
        received = [next(deltas) for _ in range(5)]
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        received += list(deltas)
        row = stored(services["dsn"], stream.job_id)
        assert stream.status == row["status"] == "partial" and row["content"] == "".join(received)

        waiting = client.stream_chat(f"s-{uuid.uuid4()}", "Say hello.", max_tokens=10, idempotency_key=key())
        wait_for(lambda: events(services["dsn"], trace_id=waiting.trace_id, type="job.deferred"), 60,
                 what="the chat to be deferred while the server is down")
        server = start_llama(cache, tmp_path, port)
        list(waiting)
        assert waiting.status == "complete" and [f["type"] for f in waiting.frames].count("ready") == 1
        assert not events(services["dsn"], trace_id=waiting.trace_id, type="job.dead")
    finally:
        assert group.terminate() == 0
        client.broker.close()
        server.stop()
