"""Chat completion on both brokers: real worker processes, frames to a real listener, the simulator's
streaming endpoint over real HTTP, messages in Postgres."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import psycopg
import pytest

from fleet.shared.frames import FrameListener
from fleet.shared.health import CACHE_S

from .conftest import started_fleet
from .embedding_support import API_KEY
from .helpers import dead_letters, events, wait_for

pytestmark = pytest.mark.usefixtures("fresh_chat_sim")

USAGE = "sim-usage"  # its template's tokens are measured in the test of that
LEARNED = "sim-learned"  # its window is learned from a refusal
REPORTED = {style: f"sim-reported-{style}" for style in ("vllm", "openrouter", "llama.cpp")}


@pytest.fixture(scope="module", params=["pgmq", "redis"])
def cfleet(request, services, sim, tmp_path_factory):
    env = {
        "CHAT_API_BASE": f"{sim.url}/v1",
        "CHAT_API_KEY": API_KEY,
        "CHAT_KEEPALIVE_S": "0.2",
        "REQUIRE_IDEMPOTENCY": "true",
        "CHAT_MODEL_DEFAULT": "sim-chat",
        "CHAT_CONTEXT_WINDOWS": json.dumps({"sim-windowed": 200}),
        # models whose facts each test learns afresh (what a process learned of a model, it keeps)
        "CHAT_MODELS": ",".join([USAGE, LEARNED, *REPORTED.values()]),
        "HEALTH_RECHECK_S": "600",
    }
    with psycopg.connect(services["dsn"], autocommit=True) as conn:  # each broker's fleet learns afresh
        conn.execute("delete from chat_model_facts")
    with started_fleet(services, request.param, tmp_path_factory.mktemp(f"chat-{request.param}"), **env) as f:
        yield f


@pytest.fixture
def fresh_chat_sim(fresh_sim):
    httpx.post(
        f"{fresh_sim.url}/_sim/config",
        json={"ttft_ms": 0, "tokens_per_s": 0, "answer_tokens": 12, "cut_after_tokens": 3},
    )
    return fresh_sim


def chat_calls(sim) -> list[dict]:
    """The streamed chat requests (the answers), without the fleet's short measuring calls."""
    return [r for r in httpx.get(f"{sim.url}/_sim/log").json() if r["path"] == "/v1/chat/completions" and r["stream"]]


def measure_calls(sim) -> list[dict]:
    """The non-streamed one-token calls the fleet makes to learn a model's facts."""
    log = httpx.get(f"{sim.url}/_sim/log").json()
    return [r for r in log if r["path"] == "/v1/chat/completions" and not r["stream"]]


def stored_answer(dsn: str, job_id: str) -> dict:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "select content, status, tokens_in, tokens_out, tokens_estimated, finish_reason, model from messages"
            " where job_id = %s and role = 'assistant'",
            (job_id,),
        ).fetchone()
    return dict(
        zip(["content", "status", "tokens_in", "tokens_out", "tokens_estimated", "finish_reason", "model"], row)
    )


def key() -> str:
    return f"k-{uuid.uuid4()}"


def test_frames_arrive_in_order_and_deltas_equal_the_stored_message(cfleet, sim):
    httpx.post(f"{sim.url}/_sim/config", json={"ttft_ms": 1500, "tokens_per_s": 200})
    stream = cfleet.client.stream_chat(f"s-{uuid.uuid4()}", "hello there", idempotency_key=key())
    deltas = list(stream)
    kinds = [f["type"] for f in stream.frames]
    assert kinds[0] == "ready" and kinds[-1] == "chat.done"
    assert kinds.count("keepalive") >= 2  # 1.5 s to the first token, a keepalive every 0.2 s (CHAT_KEEPALIVE_S)
    first_delta = kinds.index("chat.delta")
    assert set(kinds[1:first_delta]) == {"keepalive"} and set(kinds[first_delta:-1]) == {"chat.delta"}, kinds
    seqs = [f["seq"] for f in stream.frames]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert len(deltas) == 12
    row = stored_answer(cfleet.dsn, stream.job_id)
    assert "".join(deltas) == stream.text == row["content"]
    assert row["status"] == "complete" and row["finish_reason"] == "stop" and row["model"] == "sim-chat"
    # usage from the provider's usage chunk (two words and the template's 4 + 3 tokens), not estimated
    assert row["tokens_out"] == 12 and row["tokens_in"] == 9 and row["tokens_estimated"] is False
    assert stream.usage == {"prompt_tokens": 9, "completion_tokens": 12, "estimated": False}
    (call,) = chat_calls(sim)
    assert call["stream"] is True and call["stream_options"] == {"include_usage": True}


def test_history_is_sent_within_the_session(cfleet, sim):
    session = f"s-{uuid.uuid4()}"
    cfleet.client.chat(session, "first question", idempotency_key=key())
    cfleet.client.chat(session, "second question", idempotency_key=key())
    calls = chat_calls(sim)
    assert [c["n_messages"] for c in calls] == [1, 3]  # user; then user, assistant, user


@pytest.mark.parametrize("fault", ["cut", "malformed"])
def test_a_broken_stream_ends_partial_with_an_error_frame(cfleet, sim, fault):
    httpx.post(f"{sim.url}/_sim/config", json={"fail_next": [fault], "cut_after_tokens": 4})
    stream = cfleet.client.stream_chat(f"s-{uuid.uuid4()}", "tell me more", idempotency_key=key())
    deltas = list(stream)
    assert stream.status == "partial" and stream.frames[-1]["type"] == "error"
    assert stream.error["error_class"] == "StreamBroken"
    row = stored_answer(cfleet.dsn, stream.job_id)
    assert row["status"] == "partial" and row["tokens_estimated"] is True and row["tokens_out"] > 0
    assert "".join(deltas) == row["content"] == stream.text  # no duplicated text
    assert len(deltas) == 4
    assert len(chat_calls(sim)) == 1  # not restarted silently


def test_a_repeated_idempotency_key_returns_the_stored_answer_without_a_provider_call(cfleet, sim):
    session, k = f"s-{uuid.uuid4()}", key()
    first = cfleet.client.chat(session, "same question", idempotency_key=k)
    second = cfleet.client.chat(session, "same question", idempotency_key=k)
    assert first.status == second.status == "complete"
    assert second.text == first.text and second.frames[0].get("replayed") is True
    assert len(chat_calls(sim)) == 1
    with psycopg.connect(cfleet.dsn, autocommit=True) as conn:
        roles = conn.execute("select role from messages where session_id = %s order by id", (session,)).fetchall()
    assert [r[0] for r in roles] == ["user", "assistant"]


def test_429_before_the_stream_is_retried_after_retry_after(cfleet, sim):
    httpx.post(f"{sim.url}/_sim/config", json={"fail_next": [429], "retry_after_s": 1.5})
    stream = cfleet.client.chat(f"s-{uuid.uuid4()}", "busy?", idempotency_key=key())
    assert stream.status == "complete"
    first, second = chat_calls(sim)
    assert first["status"] == 429 and second["status"] == 200
    assert second["t"] - first["t"] >= 1.45


def test_401_is_dead_lettered_at_once_with_an_error_frame(cfleet, sim):
    httpx.post(f"{sim.url}/_sim/config", json={"api_key": "another-key"})
    stream = cfleet.client.chat(f"s-{uuid.uuid4()}", "who am i", idempotency_key=key())
    assert stream.status == "error" and stream.error["error_class"] == "ProviderError"
    assert "401" in stream.error["message"]
    assert len(chat_calls(sim)) == 1
    dl = wait_for(lambda: dead_letters(cfleet.dsn, stream.trace_id), 60, what="the dead letter")
    assert "chat answered 401" in dl[0]["reason"] and API_KEY not in dl[0]["reason"]


def test_require_idempotency_rejects_a_job_without_a_key(cfleet, sim):
    stream = cfleet.client.chat(f"s-{uuid.uuid4()}", "no key", timeout_s=20)
    assert stream.status == "error"
    dl = wait_for(lambda: dead_letters(cfleet.dsn, stream.trace_id), 60, what="the dead letter")
    assert dl[0]["reason"] == (
        "permanent error: InvalidPayload: idempotency_key is required (REQUIRE_IDEMPOTENCY=true)"
    )
    assert chat_calls(sim) == []


def test_a_model_the_configuration_does_not_name_is_dead_lettered(cfleet, sim):
    """A producer other than the gateway cannot pick a model (a cost) or grow the model metric labels."""
    stream = cfleet.client.chat(
        f"s-{uuid.uuid4()}", "expensive?", model="the-most-expensive-model", idempotency_key=key(), timeout_s=60
    )
    assert stream.status == "error" and stream.error["error_class"] == "InvalidPayload"
    dl = wait_for(lambda: dead_letters(cfleet.dsn, stream.trace_id), 60, what="the dead letter")
    assert "model 'the-most-expensive-model' is not configured" in dl[0]["reason"]
    assert chat_calls(sim) == []


def test_a_listener_that_joins_after_the_end_gets_the_answer(cfleet, sim):
    trace = cfleet.trace()
    job_id = str(uuid.uuid4())
    cfleet.client.enqueue(
        "chat_completion",
        {"session_id": f"s-{uuid.uuid4()}", "content": "late", "idempotency_key": key()},
        trace_id=trace,
        job_id=job_id,
    )
    cfleet.wait_done(trace, 1)
    frames = list(FrameListener(job_id).frames(timeout=10))
    done = frames[-1]
    assert done["type"] == "chat.done" and done["status"] == "complete"
    assert "".join(f["text"] for f in frames if f["type"] == "chat.delta") == done["text"]
    assert done["text"] == stored_answer(cfleet.dsn, job_id)["content"]


def test_rls_lets_a_user_read_only_their_own_sessions(cfleet, sim):
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    sa, sb = f"s-{uuid.uuid4()}", f"s-{uuid.uuid4()}"
    cfleet.client.chat(sa, "alice asks", idempotency_key=key(), user_id=alice)
    cfleet.client.chat(sb, "bob asks", idempotency_key=key(), user_id=bob)
    with psycopg.connect(cfleet.dsn, autocommit=True) as conn:

        def visible(role: str, sub: str | None) -> set[str]:
            with conn.transaction():
                conn.execute(f"set local role {role}")
                if sub:
                    conn.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps({"sub": sub}),))
                return {
                    r[0]
                    for r in conn.execute("select session_id from messages where session_id = any(%s)", ([sa, sb],))
                }

        assert visible("authenticated", alice) == {sa}
        assert visible("authenticated", bob) == {sb}
        assert visible("authenticated", None) == set()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            visible("anon", None)


def test_a_session_of_another_user_is_refused(cfleet, sim):
    session = f"s-{uuid.uuid4()}"
    cfleet.client.chat(session, "mine", idempotency_key=key(), user_id=str(uuid.uuid4()))
    stream = cfleet.client.chat(session, "not yours", idempotency_key=key(), user_id=str(uuid.uuid4()))
    assert stream.status == "error" and "belongs to another user" in stream.error["message"]


def test_cli_chat_prints_the_streamed_answer(cfleet, sim):
    import os

    from .test_cli_and_services import fleet_cli

    env = dict(os.environ) | {"FLEET_BROKER": cfleet.kind}
    out = fleet_cli("chat", "hello from the cli", "--session", f"s-{uuid.uuid4()}", "--key", key(), env=env).stdout
    assert len(out.split()) == 12


# -- what real servers do (tests/fixtures/openai/; conformance/test_chat.py runs the same against llama.cpp) --


def test_a_stream_cut_with_done_but_no_finish_reason_is_partial(cfleet, sim):
    """llama.cpp's server ends a running stream with [DONE] and no finish_reason when another request
    arrives: that answer is cut, so it is stored partial, never complete."""
    httpx.post(f"{sim.url}/_sim/config", json={"interrupt_streams": True, "tokens_per_s": 10, "answer_tokens": 30})
    first = cfleet.client.stream_chat(f"s-{uuid.uuid4()}", "a long answer please", idempotency_key=key())
    deltas = iter(first)
    received = [next(deltas)]  # the first answer is streaming
    second = cfleet.client.chat(f"s-{uuid.uuid4()}", "meanwhile", idempotency_key=key())
    received += list(deltas)
    assert second.status == "complete" and len(second.text.split()) == 30
    assert first.status == "partial" and "without a finish_reason" in first.error["message"]
    row = stored_answer(cfleet.dsn, first.job_id)
    assert row["status"] == "partial" and row["finish_reason"] is None
    assert row["content"] == "".join(received) and 0 < len(row["content"].split()) < 30


def test_usage_without_a_usage_chunk_counts_the_template_tokens_measured_against_the_server(cfleet, sim):
    """A server that ignores stream_options.include_usage (llama.cpp): the prompt is counted with its
    tokenizer plus the chat template's tokens, measured once against the server's own usage (SmolLM2's
    template adds a system prompt of its own: 25 tokens once, 5 a message), and the answer marked estimated."""
    httpx.post(
        f"{sim.url}/_sim/config",
        json={"send_usage": False, "tokenizer": True, "template_tokens_per_message": 5, "template_tokens": 25},
    )
    session = f"s-{uuid.uuid4()}"
    stream = cfleet.client.chat(session, "how many tokens is this", model=USAGE, idempotency_key=key())
    row = stored_answer(cfleet.dsn, stream.job_id)
    # five words, one message of 5 template tokens, 25 once: what the server counts itself
    assert (row["tokens_in"], row["tokens_out"], row["tokens_estimated"]) == (5 + 5 + 25, 12, True)
    assert stream.usage == {"prompt_tokens": 35, "completion_tokens": 12, "estimated": True}
    assert [(c["n_messages"], c["max_tokens"]) for c in measure_calls(sim)] == [(1, 1), (3, 1)]
    again = cfleet.client.chat(session, "and this one", model=USAGE, idempotency_key=key())
    # user, assistant, user: 5 + 12 + 3 words, 3 messages: the server's count, and measured only once
    assert again.usage["prompt_tokens"] == 20 + 3 * 5 + 25 and len(measure_calls(sim)) == 2


WINDOWED = "sim-windowed"  # CHAT_CONTEXT_WINDOWS gives it 200 tokens


def test_the_history_is_fitted_into_the_models_context_window(cfleet, sim):
    """Over the window the server answers 200 with an empty stream; the history must leave room."""
    httpx.post(f"{sim.url}/_sim/config", json={"context_window": 200})
    session, question = f"s-{uuid.uuid4()}", " ".join(f"word{i}" for i in range(90))
    for _ in range(3):
        stream = cfleet.client.chat(session, question, model=WINDOWED, max_tokens=20, idempotency_key=key())
        assert stream.status == "complete" and len(stream.text.split()) == 20
    assert [c["n_messages"] for c in chat_calls(sim)] == [1, 1, 1]  # 90 words twice do not fit 200 tokens


def test_a_message_over_the_context_window_is_refused_with_the_reason(cfleet, sim):
    """CHAT_CONTEXT_WINDOWS names the model's window: what the server reports does not change it."""
    httpx.post(f"{sim.url}/_sim/config", json={"context_window": 200, "report_window": "vllm", "models": [WINDOWED]})
    stream = cfleet.client.chat(f"s-{uuid.uuid4()}", "word " * 400, model=WINDOWED, idempotency_key=key())
    assert stream.status == "error" and stream.error["error_class"] == "ContextWindowExceeded"
    assert "exceed the context window of sim-windowed (200 tokens" in stream.error["message"]
    assert chat_calls(sim) == []  # known before sending
    (dl,) = dead_letters(cfleet.dsn, stream.trace_id)
    assert dl["reason"].startswith("permanent error: ContextWindowExceeded") and dl["attempts"] == 1


def test_an_empty_answer_over_the_window_is_a_permanent_error_not_a_retried_fault(cfleet, sim):
    """Short words count less in the fleet's estimate than in the server's tokenizer: the prompt goes,
    the server answers nothing, and its refusal of the same prompt (not streamed) tells why."""
    httpx.post(f"{sim.url}/_sim/config", json={"context_window": 200, "tokenizer": True})
    stream = cfleet.client.chat(f"s-{uuid.uuid4()}", "a " * 250, model=WINDOWED, max_tokens=10, idempotency_key=key())
    assert stream.status == "error" and stream.error["error_class"] == "ContextWindowExceeded"
    assert "the server refused the prompt (257 tokens): it does not fit" in stream.error["message"]
    assert len(chat_calls(sim)) == 1  # not retried
    (dl,) = dead_letters(cfleet.dsn, stream.trace_id)
    assert dl["attempts"] == 1 and "does not fit the context window of sim-windowed" in dl["reason"]


@pytest.mark.parametrize("style", list(REPORTED))
def test_a_window_the_server_reports_fits_the_history_before_sending(cfleet, sim, style):
    """vLLM and OpenRouter report the window in /v1/models, llama.cpp's server in /props: no setting needed."""
    model = REPORTED[style]
    httpx.post(f"{sim.url}/_sim/config", json={"context_window": 200, "report_window": style, "models": [model]})
    session, question = f"s-{uuid.uuid4()}", " ".join(f"word{i}" for i in range(90))
    for _ in range(3):
        stream = cfleet.client.chat(session, question, model=model, max_tokens=20, idempotency_key=key())
        assert stream.status == "complete" and len(stream.text.split()) == 20, stream.error
    assert [c["n_messages"] for c in chat_calls(sim)] == [1, 1, 1]  # never over the window
    assert measure_calls(sim) == []


def test_a_window_reported_nowhere_is_learned_from_the_servers_refusal(cfleet, sim):
    """llama-cpp-python reports no window: the first prompt over it comes back empty, the server's refusal of
    the same prompt names the window, and the history fitted into it is sent at once, in the same attempt."""
    httpx.post(f"{sim.url}/_sim/config", json={"context_window": 200, "models": [LEARNED]})
    session, question = f"s-{uuid.uuid4()}", " ".join(f"word{i}" for i in range(90))
    streams = [
        cfleet.client.chat(session, question, model=LEARNED, max_tokens=20, idempotency_key=key()) for _ in range(3)
    ]
    assert [s.status for s in streams] == ["complete"] * 3, [s.error for s in streams]
    # the second turn is sent whole (3 messages), refused, and sent again fitted; the third fits at once
    assert [c["n_messages"] for c in chat_calls(sim)] == [1, 3, 1, 1]
    (refused,) = measure_calls(sim)
    assert refused["status"] == 400 and refused["n_messages"] == 3
    for s in streams:
        assert len(events(cfleet.dsn, trace_id=s.trace_id, type="job.started")) == 1  # no retry
    assert dead_letters(cfleet.dsn, streams[1].trace_id) == []


def test_one_ready_frame_per_job_however_often_it_is_deferred(cfleet, sim):
    """A provider marked down defers the job again and again; its listener hears `ready` once."""
    with psycopg.connect(cfleet.dsn, autocommit=True) as conn:
        conn.execute(
            "insert into provider_health (provider, model, kind, status, consecutive_failures)"
            " values ('chat', 'sim-chat', 'chat', 'down', 9) on conflict (provider, model) do update"
            " set status = 'down', consecutive_failures = 9, checked_at = now()"
        )
    time.sleep(CACHE_S + 0.2)  # the workers' cached view of the provider's health has expired
    try:
        stream = cfleet.client.stream_chat(f"s-{uuid.uuid4()}", "are you there", idempotency_key=key())
        wait_for(
            lambda: len(events(cfleet.dsn, trace_id=stream.trace_id, type="job.deferred")) >= 3,
            30,
            what="three deferrals",
        )
        with psycopg.connect(cfleet.dsn, autocommit=True) as conn:
            conn.execute(
                "update provider_health set status = 'healthy', consecutive_failures = 0 where provider = 'chat'"
            )
        list(stream)
    finally:
        with psycopg.connect(cfleet.dsn, autocommit=True) as conn:
            conn.execute("delete from provider_health")
    assert stream.status == "complete"
    assert [f["type"] for f in stream.frames].count("ready") == 1
