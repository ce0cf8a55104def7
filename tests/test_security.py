"""Attacks through the front door: a worker role that cannot change the schema, payloads that try to
pick a provider URL, a table, a queue or an actor. (Signed envelopes: test_signing.py; secrets in
logs, events, dead letters and metrics: test_cli_and_services.py and the soak's scan; RLS as anon
and as two authenticated users: test_chat.py and test_lifecycle.py.)"""

from __future__ import annotations

import secrets
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from fleet.shared.errors import InvalidPayload
from fleet.shared.registry import UnknownJobType

from .conftest import make_client, worker_env
from .embedding_support import API_KEY, embed_env
from .helpers import WorkerGroup, dead_letters, events, pgmq_send, wait_for


@pytest.fixture(scope="module")
def worker_login(services):
    """A login role that is a member of fleet_worker, as DEPLOY advises for workers."""
    name, password = f"fleet_app_{uuid.uuid4().hex[:6]}", secrets.token_urlsafe(16)
    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        conn.execute(f"create role {name} login password '{password}' in role fleet_worker")
    params = conninfo_to_dict(services["dsn"]) | {"user": name, "password": password}
    yield make_conninfo(**params)
    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        conn.execute(f"drop owned by {name}")
        conn.execute(f"drop role {name}")


@pytest.mark.parametrize(
    "statement",
    [
        "create table intruder (id int)",
        "alter table bus_events add column intruder int",
        "drop table dead_letters",
        "truncate bus_events",
        "create function intruder() returns int language sql as 'select 1'",
        "alter table pgmq.q_echo add column intruder int",
        "create index intruder on messages (content)",
    ],
)
def test_the_worker_role_cannot_change_the_schema(worker_login, statement):
    with psycopg.connect(worker_login, autocommit=True) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(statement)


class Canary:
    """An HTTP server that a payload must never make the fleet call."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        canary = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                canary.requests.append(self.path)
                self.send_response(200)
                self.end_headers()

            do_GET = do_PATCH = do_POST

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_fleet_on_the_worker_role_runs_jobs_and_refuses_hostile_payloads(services, sim, worker_login, tmp_path):
    canary = Canary()
    env = worker_env(
        services,
        "pgmq",
        **embed_env(sim),
        DATABASE_URL=worker_login,
        CHAT_API_BASE=f"{sim.url}/v1",
        CHAT_API_KEY=API_KEY,
        LETTA_API_BASE_URL=sim.url,
        LETTA_API_KEY=API_KEY,
    )
    group = WorkerGroup(env, processes=1, threads=4, log_dir=tmp_path).start()
    client = make_client("pgmq")
    try:
        trace = str(uuid.uuid4())
        hostile = [
            ("chat_completion", {"session_id": "s", "content": "hi", "api_base": canary.url}),
            ("chat_completion", {"session_id": "s", "content": "hi", "base_url": canary.url}),
            ("embed_documents", {"documents": [{"source_id": "a", "content": "x"}], "api_base": canary.url}),
            ("embed_documents", {"documents": [{"source_id": "a", "content": "x"}], "table": "pg_authid"}),
            ("embed_documents", {"source": 'docs"; drop table bus_events; --', "ids": [1]}),
            (
                "create_agent",
                {"user_id": str(uuid.uuid4()), "template": "t", "llm_config": {"model_endpoint": canary.url}},
            ),
            ("memory_lifecycle", {"project_id": "p", "actions": ["expire; drop table memories"]}),
        ]
        for actor, payload in hostile:  # what the SDK's models refuse, the workers must refuse too: sent raw
            try:
                client.enqueue(actor, payload, trace_id=trace)
            except InvalidPayload:
                client.broker.enqueue(client.message(actor, payload, trace))
        client.enqueue("echo", {"message": "the worker role works"}, trace_id=trace)
        wait_for(
            lambda: len(dead_letters(services["dsn"], trace)) == len(hostile), 60, what="the hostile jobs' dead letters"
        )
        reasons = [d["reason"] for d in dead_letters(services["dsn"], trace)]
        assert all(r.startswith("permanent error: ") for r in reasons), reasons
        assert any("unregistered" in r for r in reasons) and any("Extra inputs are not permitted" in r for r in reasons)
        assert canary.requests == []
        # The echo job, on the worker role, on a queue of its own: its events commit with its ack, which
        # need not come before the other queues' dead letters.
        wait_for(lambda: events(services["dsn"], trace_id=trace, type="job.succeeded"), 30, what="the echo job")
        with psycopg.connect(services["dsn"], autocommit=True) as conn:
            assert conn.execute("select to_regclass('bus_events') is not null").fetchone()[0]
            done = conn.execute(
                "select count(*) from bus_events where trace_id = %s and type = 'job.succeeded'", (trace,)
            ).fetchone()[0]
        assert done == 1
    finally:
        client.broker.close()
        code = group.terminate()
        canary.stop()
    assert code == 0, group.logs()[-3000:]


def test_payloads_cannot_name_an_unregistered_queue_or_another_queues_actor(services, pgmq_fleet):
    with pytest.raises(UnknownJobType):
        pgmq_fleet.client.enqueue("pg_catalog", {"x": 1})
    with pytest.raises(InvalidPayload, match="NUL"):
        pgmq_fleet.client.enqueue("echo", {"message": "a\x00b"})
    # A raw message on the echo queue that asks for an actor of another queue is refused, not run.
    msg = pgmq_send(
        services["dsn"], "echo", {"actor": "create_agent", "payload": {"user_id": str(uuid.uuid4()), "template": "t"}}
    )
    wait_for(
        lambda: [d for d in dead_letters(services["dsn"], queue="echo") if d["message_id"] == f"pgmq:echo:{msg}"],
        30,
        what="the raw message's dead letter",
    )


def test_values_under_secret_looking_keys_are_masked_in_dead_letters_and_events(services):
    """Redaction looks at dict keys too: a password or API key in a payload is stored masked, at any depth."""
    from fleet.shared import events as bus
    from fleet.shared.deadletters import DeadLetter, record_dead_letter

    trace = str(uuid.uuid4())
    planted = {
        "password": "hunter2-planted",
        "api_key": "plain-planted-1",
        "Authorization": "Token planted-2",
        "x-api-key": "planted-3",
        "db_password": "planted-4",
        "client_secret": "planted-5",
        "key": "planted-6",
    }
    payload = {
        "message": "hi",
        **planted,
        "deep": [{"nested": {"access_token": "planted-7"}}],
        "idempotency_key": "order-7",
        "usage": {"total_tokens": 12},
    }
    record_dead_letter(
        DeadLetter(
            queue="echo",
            actor="echo",
            message_id=trace,
            message={"args": [payload]},
            reason="permanent error: test",
            attempts=1,
            trace_id=trace,
        )
    )
    bus.emit("test.secrets", trace_id=trace, request=payload)
    bus.flush()
    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        stored = conn.execute("select message::text from dead_letters where trace_id = %s", (trace,)).fetchone()[0]
        logged = "".join(
            r[0] for r in conn.execute("select payload::text from bus_events where trace_id = %s", (trace,))
        )
    for text in (stored, logged):
        assert "planted" not in text, text
        assert '"idempotency_key": "order-7"' in text and '"total_tokens": 12' in text  # not secrets: kept
        assert text.count("[redacted]") == 8


def test_nan_and_infinite_numbers_are_refused_at_enqueue(services, pgmq_fleet):
    """JSON has no NaN: a payload holding one is refused by name at the SDK, not stored as null."""
    for value in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(InvalidPayload, match=r"\$\.scores\[1\]"):
            pgmq_fleet.client.enqueue("echo", {"message": "m", "scores": [1.0, value]})


def test_a_registered_source_declares_which_tenants_read_its_vectors(services):
    """EMBED_SOURCES' `readers` becomes the source's row in vector_shared_sources (which the row-level
    security of the vector tables reads, tested as two users in test_gateway_attacks.py)."""
    from pydantic import ValidationError

    from fleet.shared.config import Settings
    from fleet.workers.embed.embedding import Source, load_source_docs

    table, name = f"shared_{uuid.uuid4().hex[:8]}", f"src{uuid.uuid4().hex[:8]}"
    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        conn.execute(f"create table {table} (id int primary key, body text)")
        conn.execute(f"insert into {table} values (1, '')")  # no content: nothing to embed, only the declaration

        def declared(readers: str | None) -> list[tuple]:
            spec = {"table": table, "content_column": "body"} | ({"readers": readers} if readers else {})
            load_source_docs(conn, name, ["1"], Settings(EMBED_SOURCES={name: spec}), "any-model")
            return conn.execute("select project_id from vector_shared_sources where source = %s", (name,)).fetchall()

        assert declared(None) == []
        assert declared("authenticated") == [(None,)]
        assert declared("project:acme") == [("acme",)]
        assert declared(None) == [("acme",)]  # undeclared: the row stays as it is
        assert declared("operator") == []
        conn.execute(f"drop table {table}")
    for bad in ("everyone", "project:", "project:a:b", "authenticated "):
        with pytest.raises(ValidationError):
            Source.model_validate({"table": "t", "content_column": "c", "readers": bad})


def test_a_users_search_finds_their_rows_behind_everyone_elses(services):
    """Row-level security filters after the HNSW index: a user's nearest rows must come back even when
    hundreds of other users' rows are nearer to the query (an index scan alone returns 40 candidates)."""
    from .test_gateway_attacks import as_user

    alice, bob, tag = str(uuid.uuid4()), str(uuid.uuid4()), uuid.uuid4().hex[:8]
    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        dim = conn.execute("select get_vector_dim('vector_documents')").fetchone()[0]

        def vector(first: float) -> str:
            return "[" + ",".join([str(first)] + ["0.01"] * (dim - 1)) + "]"

        rows = [(f"u:{bob}:{tag}-{i}", vector(1.0 + i / 1000)) for i in range(300)]
        rows += [(f"u:{alice}:{tag}-{i}", vector(-1.0 - i)) for i in range(5)]  # far from the query
        with conn.cursor() as cur:
            cur.executemany(
                "insert into vector_documents (source_id, chunk_index, content, embedding, model,"
                " content_hash) values (%s, 0, 'x', %s::vector, 'm', 'h')",
                rows,
            )
        try:
            # 50: other tests' shared sources are readable by every user too and may come first
            query = (
                f"select source_id from match_agent_knowledge_vectors('{vector(1.0)}'::vector, 50, '{{}}'::jsonb, -1)"
            )
            with conn.transaction():
                conn.execute("set local enable_seqscan = off")  # the index, as on a table of real size
                found = as_user(conn, alice, query)
        finally:
            conn.execute(
                "delete from vector_documents where source_id like %s or source_id like %s",
                (f"u:{bob}:{tag}-%", f"u:{alice}:{tag}-%"),
            )
    assert sorted(r[0] for r in found if r[0].startswith(f"u:{alice}:")) == [f"u:{alice}:{tag}-{i}" for i in range(5)]
    assert not any(r[0].startswith(f"u:{bob}:") for r in found)
