"""What only the pgmq broker has: raw JSON jobs from SQL, its own malformed-message paths, pooler mode."""

from __future__ import annotations

import json
import uuid

import psycopg

from .conftest import make_client, started_fleet
from .helpers import dead_letters, events, pgmq_send, wait_for


def test_raw_pgmq_send_from_sql_is_processed(pgmq_fleet):
    marker = f"from sql {uuid.uuid4()}"
    msg_id = pgmq_send(pgmq_fleet.dsn, "echo", {"message": marker, "record": True})
    job_id = f"pgmq:echo:{msg_id}"
    evs = wait_for(lambda: [e for e in events(pgmq_fleet.dsn, job_id=job_id) if e["type"] == "echo.done"], 20,
                   what="the raw job to run")
    assert evs[0]["payload"]["message"] == marker
    started = events(pgmq_fleet.dsn, job_id=job_id, type="job.started")
    assert len(started) == 1


def test_raw_messages_that_cannot_be_jobs_go_to_dead_letters(pgmq_fleet):
    dsn = pgmq_fleet.dsn
    ids = {
        "array": pgmq_send(dsn, "echo", [1, 2, 3]),
        "string": pgmq_send(dsn, "echo", json.dumps("just a string")),
        "shape": pgmq_send(dsn, "echo", {"sleep_ms": -5}),
        "envelope": pgmq_send(dsn, "echo", {"queue_name": "echo", "actor_name": "echo", "args": "x", "kwargs": {},
                                            "options": {}, "message_id": "m", "message_timestamp": 1}),
    }

    def reasons():
        rows = {d["message_id"]: d["reason"] for d in dead_letters(dsn, queue="echo")}
        # An envelope is dead-lettered under its own message_id; other raw messages under their pgmq id.
        found = {k: rows.get("m" if k == "envelope" else f"pgmq:echo:{i}") for k, i in ids.items()}
        return found if all(found.values()) else None

    found = wait_for(reasons, 20, what="four dead letters")
    assert found["array"] == "a raw message must be a JSON object, got list"
    assert found["string"] == "a raw message must be a JSON object, got str"
    assert "sleep_ms: Input should be greater than or equal to 0" in found["shape"]
    assert found["envelope"].startswith("malformed message envelope: args must be a list")
    # the raw body is kept for inspection and retry
    raw = {d["message_id"]: d["raw"] for d in dead_letters(dsn, queue="echo")}
    assert json.loads(raw[f"pgmq:echo:{ids['array']}"]) == [1, 2, 3]
    # archived (the ack batch follows the dead letter), not left in the queue
    def archived():
        with psycopg.connect(dsn, autocommit=True) as conn:
            return conn.execute("select count(*) from pgmq.a_echo where msg_id = any(%s)", (list(ids.values()),)).fetchone()[0] == 4

    wait_for(archived, 10, what="the four messages to be archived")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("select count(*) from pgmq.q_echo where msg_id = any(%s)", (list(ids.values()),)).fetchone()[0] == 0
    ok = pgmq_fleet.trace()
    pgmq_fleet.client.enqueue("echo", {}, trace_id=ok)
    pgmq_fleet.wait_done(ok, 1)


def test_oversized_raw_message_is_dead_lettered(pgmq_fleet):
    msg_id = pgmq_send(pgmq_fleet.dsn, "echo", {"message": "x" * 1_100_000})
    dl = wait_for(lambda: [d for d in dead_letters(pgmq_fleet.dsn, queue="echo") if d["message_id"] == f"pgmq:echo:{msg_id}"],
                  20, what="the oversized message's dead letter")
    assert "exceeds FLEET_MAX_PAYLOAD_BYTES" in dl[0]["reason"]


def test_default_mode_listens(pgmq_fleet):
    with psycopg.connect(pgmq_fleet.dsn, autocommit=True) as conn:
        query = conn.execute(
            "select query from pg_stat_activity where application_name = 'fleet-notifier'"
        ).fetchone()
    assert query and query[0].lower().startswith("listen")


def test_transaction_pooler_mode_polls_without_listen(services, tmp_path):
    """FLEET_DB_POOLER=true: no prepared statements, no LISTEN; jobs still flow (by polling)."""
    def notifiers():
        with psycopg.connect(services["dsn"], autocommit=True) as conn:
            return conn.execute("select count(*) from pg_stat_activity where application_name = 'fleet-notifier'").fetchone()[0]

    before = notifiers()  # other worker groups of this test run may be listening
    with started_fleet(services, "pgmq", tmp_path, FLEET_DB_POOLER="true", FLEET_POLL_INTERVAL_MS="50") as f:
        trace = f.trace()
        f.client.enqueue_many("echo", [{"message": str(i)} for i in range(20)], trace_id=trace)
        f.wait_done(trace, 20)
        assert notifiers() == before


def test_enqueue_batch_uses_send_batch_and_keeps_order(services):
    client = make_client("pgmq")
    trace = str(uuid.uuid4())
    try:
        done = client.enqueue_many("echo", [{"message": str(i)} for i in range(2500)], trace_id=trace, delay_ms=3_600_000)
        assert len({d.job_id for d in done}) == 2500
        with psycopg.connect(services["dsn"], autocommit=True) as conn:
            rows = conn.execute(
                "select message->'args'->0->>'message' from pgmq.q_echo where message->'options'->>'trace_id' = %s order by msg_id",
                (trace,),
            ).fetchall()
            assert [r[0] for r in rows] == [str(i) for i in range(2500)]
            conn.execute("delete from pgmq.q_echo where message->'options'->>'trace_id' = %s", (trace,))
    finally:
        client.broker.close()
