"""A real llama.cpp server killed mid-stream and down for a while, with workers of their own (no other
worker group may take the chats: this module runs after test_chat.py's has stopped)."""

from __future__ import annotations

import os
import signal
import uuid

import pytest

from fleet.shared.services import free_port
from tests.conftest import make_client, worker_env
from tests.helpers import WorkerGroup, events, wait_for

from .openai_servers import chat_server, start_llama  # noqa: F401  (a fixture, used by name)
from .test_chat import STORY, key, stored


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
    env = worker_env(
        services,
        "pgmq",
        CHAT_API_BASE=server.base,
        HEALTH_PROVIDERS="chat",
        HEALTH_DOWN_AFTER="3",
        CHAT_PROVIDER_MAX_RETRIES="2",
        HEALTH_RECHECK_S="2",
        FLEET_MAX_RETRIES="2",
        **server.env,
    )
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
        wait_for(
            lambda: events(services["dsn"], trace_id=waiting.trace_id, type="job.deferred"),
            60,
            what="the chat to be deferred while the server is down",
        )
        server = start_llama(cache, tmp_path, port)
        list(waiting)
        assert waiting.status == "complete" and [f["type"] for f in waiting.frames].count("ready") == 1
        assert not events(services["dsn"], trace_id=waiting.trace_id, type="job.dead")
    finally:
        assert group.terminate() == 0
        client.broker.close()
        server.stop()
