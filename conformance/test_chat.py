"""The chat family against a real llama.cpp server (llama-cpp-python's, SmolLM2-135M, a 2,048-token window),
with the same worker processes and code as production, and the default settings: nothing tells the fleet the
model's window or its chat template's tokens."""

from __future__ import annotations

import uuid

import httpx
import psycopg
import pytest

from tests.conftest import started_fleet
from tests.helpers import dead_letters, events, wait_for

from .openai_servers import chat_server  # noqa: F401  (a fixture, used by name)

STORY = "Write a long story about a dragon who learns to read."


@pytest.fixture(scope="module")
def cfleet(services, chat_server, tmp_path_factory):
    env = {"CHAT_API_BASE": chat_server.base, "HEALTH_PROVIDERS": "chat", "CHAT_KEEPALIVE_S": "1"} | chat_server.env
    with started_fleet(services, "pgmq", tmp_path_factory.mktemp("chat"), **env) as fleet:
        yield fleet


def stored(dsn: str, job_id: str) -> dict:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "select content, status, tokens_in, tokens_out, tokens_estimated, finish_reason, error"
            " from messages where job_id = %s and role = 'assistant'",
            (job_id,),
        ).fetchone()
    return dict(
        zip(["content", "status", "tokens_in", "tokens_out", "tokens_estimated", "finish_reason", "error"], row)
    )


def server_prompt_tokens(server, messages: list[dict]) -> int:
    """What the server itself counts for a prompt (its non-streamed answer carries usage)."""
    body = httpx.post(
        f"{server.base}/chat/completions",
        timeout=120,
        json={"model": server.model, "messages": messages, "max_tokens": 1},
    ).json()
    return body["usage"]["prompt_tokens"]


def key() -> str:
    return str(uuid.uuid4())


def test_a_streamed_answer_is_stored_as_streamed_with_the_servers_count(cfleet, chat_server):
    with psycopg.connect(cfleet.dsn, autocommit=True) as conn:  # a model no longer configured, left down
        conn.execute(
            "insert into provider_health (provider, model, kind, status, consecutive_failures)"
            " values ('chat', 'a-model-used-last-month', 'chat', 'down', 40) on conflict do nothing"
        )
    stream = cfleet.client.stream_chat(f"s-{uuid.uuid4()}", "hello there", max_tokens=40, idempotency_key=key())
    deltas = list(stream)
    row = stored(cfleet.dsn, stream.job_id)
    assert stream.status == row["status"] == "complete" and row["finish_reason"] in ("stop", "length")
    assert "".join(deltas) == stream.text == row["content"] and row["content"]
    assert [f["type"] for f in stream.frames].count("ready") == 1
    truth = server_prompt_tokens(chat_server, [{"role": "user", "content": "hello there"}])
    # llama.cpp never sends the usage chunk: its tokenizer, and the template's tokens measured against it
    assert abs(row["tokens_in"] - truth) <= 0.1 * truth, (row["tokens_in"], truth)
    assert 0 < row["tokens_out"] <= 41


def conversation(dsn: str, session: str) -> list[dict]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("select role, content from messages where session_id = %s order by id", (session,))
        return [{"role": role, "content": content} for role, content in rows]


def test_the_prompt_of_a_session_is_counted_within_a_tenth_of_the_servers_count(cfleet, chat_server):
    """The default system prompt SmolLM2's template adds is in the count: the template's tokens are measured."""
    session = f"s-{uuid.uuid4()}"
    for question in ("What is a queue?", "And a worker?", "How do they talk to each other?"):
        stream = cfleet.client.chat(session, question, max_tokens=30, idempotency_key=key())
        assert stream.status == "complete", stream.error
    row = stored(cfleet.dsn, stream.job_id)
    truth = server_prompt_tokens(chat_server, conversation(cfleet.dsn, session)[:-1])
    print(f"prompt tokens: the server counts {truth}, the fleet {row['tokens_in']}")
    assert abs(row["tokens_in"] - truth) <= 0.1 * truth, (row["tokens_in"], truth)


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
    """The server reports its window nowhere; it names it when it refuses the first prompt over it."""
    session = f"s-{uuid.uuid4()}"
    turn = "The quick brown fox jumps over the lazy dog. " * 60  # about 600 tokens a turn
    for n in range(6):  # from the 4th turn on, the session is past 2,048 tokens
        stream = cfleet.client.chat(session, f"Turn {n}. {turn}", max_tokens=20, idempotency_key=key(), timeout_s=300)
        assert stream.status == "complete" and stream.text, (n, stream.error)
        started = events(cfleet.dsn, trace_id=stream.trace_id, type="job.started")
        assert len(started) == 1, (n, started)  # answered at its first attempt, not after retries


def test_an_empty_answer_over_the_window_is_refused_with_its_reason(cfleet):
    """Short words weigh more in the model's tokenizer than in the estimate: the prompt is sent, the server
    answers 200 and an empty stream, and the fleet says why instead of retrying."""
    stream = cfleet.client.chat(f"s-{uuid.uuid4()}", "a " * 2100, max_tokens=10, idempotency_key=key())
    assert stream.status == "error" and stream.error["error_class"] == "ContextWindowExceeded"
    (dl,) = wait_for(lambda: dead_letters(cfleet.dsn, stream.trace_id), 30, what="the dead letter")
    assert dl["attempts"] == 1 and "does not fit the context window of" in dl["reason"]
