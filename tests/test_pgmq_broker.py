"""What only the pgmq broker has: raw JSON jobs from SQL, its own malformed-message paths, pooler mode."""

from __future__ import annotations

import json
import os
import uuid

import psycopg
import pytest

from .conftest import make_client, started_fleet
from .helpers import dead_letters, events, pgmq_send, wait_for


def test_raw_pgmq_send_from_sql_is_processed(pgmq_fleet):
    marker = f"from sql {uuid.uuid4()}"
    msg_id = pgmq_send(pgmq_fleet.dsn, "echo", {"message": marker, "record": True})
    job_id = f"pgmq:echo:{msg_id}"
    evs = wait_for(
        lambda: [e for e in events(pgmq_fleet.dsn, job_id=job_id) if e["type"] == "echo.done"],
        60,
        what="the raw job to run",
    )
    assert evs[0]["payload"]["message"] == marker
    started = events(pgmq_fleet.dsn, job_id=job_id, type="job.started")
    assert len(started) == 1


def test_raw_messages_that_cannot_be_jobs_go_to_dead_letters(pgmq_fleet):
    dsn = pgmq_fleet.dsn
    ids = {
        "array": pgmq_send(dsn, "echo", [1, 2, 3]),
        "string": pgmq_send(dsn, "echo", json.dumps("just a string")),
        "shape": pgmq_send(dsn, "echo", {"sleep_ms": -5}),
        "envelope": pgmq_send(
            dsn,
            "echo",
            {
                "queue_name": "echo",
                "actor_name": "echo",
                "args": "x",
                "kwargs": {},
                "options": {},
                "message_id": "m",
                "message_timestamp": 1,
            },
        ),
    }

    def reasons():
        rows = {d["message_id"]: d["reason"] for d in dead_letters(dsn, queue="echo")}
        # An envelope is dead-lettered under its own message_id; other raw messages under their pgmq id.
        found = {k: rows.get("m" if k == "envelope" else f"pgmq:echo:{i}") for k, i in ids.items()}
        return found if all(found.values()) else None

    found = wait_for(reasons, 60, what="four dead letters")
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
            return (
                conn.execute(
                    "select count(*) from pgmq.a_echo where msg_id = any(%s)", (list(ids.values()),)
                ).fetchone()[0]
                == 4
            )

    wait_for(archived, 60, what="the four messages to be archived")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert (
            conn.execute("select count(*) from pgmq.q_echo where msg_id = any(%s)", (list(ids.values()),)).fetchone()[0]
            == 0
        )
    ok = pgmq_fleet.trace()
    pgmq_fleet.client.enqueue("echo", {}, trace_id=ok)
    pgmq_fleet.wait_done(ok, 1)


def test_oversized_raw_message_is_dead_lettered(pgmq_fleet):
    msg_id = pgmq_send(pgmq_fleet.dsn, "echo", {"message": "x" * 1_100_000})
    dl = wait_for(
        lambda: [d for d in dead_letters(pgmq_fleet.dsn, queue="echo") if d["message_id"] == f"pgmq:echo:{msg_id}"],
        60,
        what="the oversized message's dead letter",
    )
    assert "exceeds FLEET_MAX_PAYLOAD_BYTES" in dl[0]["reason"]


def test_default_mode_listens(pgmq_fleet):
    with psycopg.connect(pgmq_fleet.dsn, autocommit=True) as conn:
        query = conn.execute("select query from pg_stat_activity where application_name = 'fleet-notifier'").fetchone()
    assert query and query[0].lower().startswith("listen")


def test_transaction_pooler_mode_polls_without_listen(services, tmp_path):
    """FLEET_DB_POOLER=true: no prepared statements, no LISTEN; jobs still flow (by polling)."""

    def notifiers():
        with psycopg.connect(services["dsn"], autocommit=True) as conn:
            return conn.execute(
                "select count(*) from pg_stat_activity where application_name = 'fleet-notifier'"
            ).fetchone()[0]

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
        done = client.enqueue_many(
            "echo", [{"message": str(i)} for i in range(2500)], trace_id=trace, delay_ms=3_600_000
        )
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


REFUSE_ACK = """
create or replace function test_refuse_ack() returns trigger language plpgsql as $$
begin
    raise exception 'this row may not be deleted (test)' using errcode = 'insufficient_privilege';
end $$;
create trigger test_refuse_ack before delete on pgmq.q_echo for each row
    when (old.message->'args'->0->>'message' = 'refuse-this-ack') execute function test_refuse_ack();
"""


def test_a_refused_round_trip_backs_off_loudly_instead_of_reconnecting(pgmq_fleet):
    """A permission or data error in the ack/read round trip is not a lost connection: the consumer logs it,
    counts it in fleet_consumer_errors_total and backs off; once the cause is gone the job is acknowledged,
    having run once."""
    import httpx

    trace = pgmq_fleet.trace()
    with psycopg.connect(pgmq_fleet.dsn, autocommit=True) as conn:
        conn.execute(REFUSE_ACK)
        try:
            pgmq_fleet.client.enqueue("echo", {"message": "refuse-this-ack", "record": True}, trace_id=trace)
            wait_for(
                lambda: pgmq_fleet.workers.logs().count("consumer.round_trip_refused") >= 3,
                30,
                what="the refused round trips to be logged",
            )
            text = httpx.get(f"http://127.0.0.1:{pgmq_fleet.workers.metrics_port}/metrics", timeout=5).text
            assert 'fleet_consumer_errors_total{error_class="InsufficientPrivilege",queue="echo"}' in text
        finally:
            conn.execute("drop trigger if exists test_refuse_ack on pgmq.q_echo")
        evs = pgmq_fleet.wait_done(trace, 1, timeout=40)
        assert len([e for e in evs if e["type"] == "echo.done"]) == 1  # kept invisible meanwhile: ran once
        wait_for(
            lambda: (
                not conn.execute(
                    "select count(*) from pgmq.q_echo where message->'args'->0->>'message' = 'refuse-this-ack'"
                ).fetchone()[0]
            ),
            60,
            what="the ack",
        )


def test_prefetched_messages_abandoned_by_a_failed_close_are_let_go(services):
    """A consumer whose connection is gone cannot return its prefetched messages; they must leave the
    process's outstanding set (no heartbeat, no prefetch slot) and come back after one visibility timeout."""
    import dramatiq

    from fleet.shared.brokers.pgmq import PgmqBroker
    from fleet.shared.config import Settings

    queue = "test_abandoned"
    broker = PgmqBroker(settings=Settings(FLEET_BROKER="pgmq", FLEET_VISIBILITY_TIMEOUT_S=2))
    broker.declare_queue(queue)
    sent = [
        dramatiq.Message(queue_name=queue, actor_name="nobody", args=({"n": i},), kwargs={}, options={})
        for i in range(3)
    ]
    broker.enqueue_many(sent)
    first = broker.consume(queue, prefetch=4, timeout=1000)
    try:
        running = next(first)  # handed to a worker; the other two stay prefetched in the consumer
        with psycopg.connect(services["dsn"], autocommit=True) as admin:
            admin.execute("select pg_terminate_backend(%s)", (first.conn.info.backend_pid,))
        first.close()
        assert broker.state(queue).outstanding == {running.pgmq_id}
        second = broker.consume(queue, prefetch=4, timeout=1000)
        again = wait_for(lambda: [m for m in [next(second)] if m is not None], 60, what="the abandoned messages")
        again += [m for m in [next(second)] if m is not None]
        assert sorted(m.args[0]["n"] for m in again) == sorted(
            m.args[0]["n"] for m in sent if m.message_id != running.message_id
        )
        for m in [running, *again]:
            second.ack(m)
        second.close()
    finally:
        broker.close()
        with psycopg.connect(services["dsn"], autocommit=True) as admin:
            admin.execute("select pgmq.drop_queue(%s)", (queue,))


def test_lazy_commit_is_scoped_to_the_round_trip_and_off_for_rejects_and_failed_attempts(services):
    """synchronous_commit = off must not outlive the consumer's own round trip (behind a transaction pooler a
    session setting reaches other clients' transactions), and applies only to plain acks of succeeded jobs."""
    import dramatiq

    from fleet.shared.brokers.pgmq import PgmqBroker
    from fleet.shared.config import Settings

    queue = "test_commit_scope"
    broker = PgmqBroker(settings=Settings(FLEET_BROKER="pgmq"))
    broker.declare_queue(queue)
    broker.enqueue(dramatiq.Message(queue_name=queue, actor_name="nobody", args=({},), kwargs={}, options={}))
    consumer = broker.consume(queue, prefetch=2, timeout=1000)
    try:
        message = next(consumer)
        consumer.ack(message)
        consumer._flush()
        assert consumer.conn.execute("show synchronous_commit").fetchone()[0] == "on"
        with psycopg.connect(services["dsn"]) as conn:  # one transaction, as a pooler would hand it on
            for lazy, expected in ((False, "on"), (True, "off")):
                conn.execute("select * from fleet_ack_and_read(%s, '{}', '{}', 1, 0, null, %s)", (queue, lazy))
                assert conn.execute("show synchronous_commit").fetchone()[0] == expected
                conn.commit()
                assert conn.execute("show synchronous_commit").fetchone()[0] == "on"
    finally:
        consumer.close()
        broker.close()
        with psycopg.connect(services["dsn"], autocommit=True) as admin:
            admin.execute("select pgmq.drop_queue(%s)", (queue,))


@pytest.mark.parametrize("path", ["payloads", "messages"])
def test_a_bulk_send_whose_commit_fails_raises_and_keeps_nothing(services, path):
    """Both producing paths share the bulk sender. A batch of several chunks is pipelined; when the commit
    itself fails (after the last chunk was sent), the caller gets the error, and no message of the batch is
    kept."""
    import threading

    import dramatiq

    from fleet.shared.brokers.pgmq import PgmqBroker
    from fleet.shared.config import Settings

    queue = f"test_commit_{path}"
    broker = PgmqBroker(settings=Settings(FLEET_BROKER="pgmq"))
    broker.declare_queue(queue)
    broker.ensure_queue(queue)
    with psycopg.connect(services["dsn"], autocommit=True) as admin:
        admin.execute(
            "create or replace function test_refuse_at_commit() returns trigger language plpgsql"
            " as $$ begin raise exception 'refused at commit'; end $$"
        )
        admin.execute(
            f"create constraint trigger refuse_at_commit after insert on pgmq.q_{queue}"
            " deferrable initially deferred for each row execute function test_refuse_at_commit()"
        )
    payloads = [{"n": i} for i in range(2500)]  # three chunks, pipelined
    outcome: list[BaseException | None] = []

    def send() -> None:
        try:
            if path == "payloads":
                broker.enqueue_payloads(queue, "nobody", payloads)
            else:
                broker.enqueue_many(
                    [
                        dramatiq.Message(queue_name=queue, actor_name="nobody", args=(p,), kwargs={}, options={})
                        for p in payloads
                    ]
                )
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001  (handed to the test's thread)
            outcome.append(e)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        sender.join(60)
        assert not sender.is_alive(), "the producer still waits after its commit failed"
        assert isinstance(outcome[0], psycopg.errors.RaiseException) and "refused at commit" in str(outcome[0])
        assert broker.pending(queue) == 0
    finally:
        broker.close()
        with psycopg.connect(services["dsn"], autocommit=True) as admin:
            admin.execute("select pgmq.drop_queue(%s)", (queue,))


def test_a_pooled_connection_the_server_ended_is_replaced_at_checkout(services):
    """The pool checks a connection before handing it out only when the server has written to it while it
    sat idle (a terminated backend's FATAL, a shutdown): a healthy one costs no round trip, an ended one is
    replaced and the caller's statement runs on a new connection."""
    import resource

    from fleet.shared.db import make_pool

    # Past descriptor 1024, as in a gateway holding a thousand streams (select.select cannot watch those).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    spare = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    pool = make_pool(min_size=1, max_size=1, name="checkout-test")
    try:
        with pool.connection() as conn:
            assert conn.fileno() > 1024
        with pool.connection() as conn:
            pid = conn.info.backend_pid
        with psycopg.connect(services["dsn"], autocommit=True) as admin:
            assert admin.execute("select pg_terminate_backend(%s)", (pid,)).fetchone()[0]
            wait_for(
                lambda: not admin.execute("select 1 from pg_stat_activity where pid = %s", (pid,)).fetchone(),
                60,
                what="the backend to end",
            )
        with pool.connection() as conn:
            assert conn.execute("select 1").fetchone()[0] == 1
            assert conn.info.backend_pid != pid
    finally:
        pool.close()
        for fd in spare:
            os.close(fd)


def test_a_payload_too_large_in_a_later_chunk_sends_nothing_of_the_batch(services):
    """Chunks are sent as they are encoded: the first ones reached the server before the third one's
    oversized payload was found, and the whole batch must still be rolled back."""
    from fleet.shared.errors import PayloadTooLarge

    client = make_client("pgmq", FLEET_MAX_PAYLOAD_BYTES=2048)  # a payload echo's model accepts can exceed it
    trace = str(uuid.uuid4())
    payloads = [{"message": str(i)} for i in range(2500)]
    payloads[2200] = {"message": "x" * (client.settings.max_payload_bytes + 1)}
    try:
        with pytest.raises(PayloadTooLarge, match="FLEET_MAX_PAYLOAD_BYTES"):
            client.enqueue_many("echo", payloads, trace_id=trace, delay_ms=3_600_000)
        with psycopg.connect(services["dsn"], autocommit=True) as conn:
            assert (
                conn.execute(
                    "select count(*) from pgmq.q_echo where message->'options'->>'trace_id' = %s", (trace,)
                ).fetchone()[0]
                == 0
            )
    finally:
        client.broker.close()


def test_a_consumer_reads_ahead_while_jobs_finish_fast_and_keeps_its_prefetch_for_slow_ones(services):
    """Jobs that finish at once let a consumer hold more than its prefetch (a round trip per batch would
    otherwise idle every worker thread); jobs of 100 ms bring it back to its prefetch once it has worked
    through what it read ahead."""
    import time

    import dramatiq

    from fleet.shared.brokers.pgmq import PgmqBroker
    from fleet.shared.config import Settings

    queue = "test_read_ahead"
    broker = PgmqBroker(settings=Settings(FLEET_BROKER="pgmq"))
    broker.declare_queue(queue)
    broker.enqueue_many(
        [
            dramatiq.Message(queue_name=queue, actor_name="nobody", args=({"n": i},), kwargs={}, options={})
            for i in range(400)
        ]
    )
    consumer = broker.consume(queue, prefetch=2, timeout=1000)
    state = broker.state(queue)

    def held() -> int:  # read and not settled: in the consumer's buffer or in a worker's hands
        return len(state.outstanding) - len(state.acks) - len(state.nacks)

    try:
        fast = []
        for _ in range(300):
            consumer.ack(next(consumer))
            fast.append(held())
        assert max(fast) > 2, "jobs that finish at once: the consumer never held more than its prefetch"
        slow = []
        for _ in range(45):  # jobs of 60 ms: longer than the read-ahead window (50 ms)
            message = next(consumer)
            slow.append(held())
            time.sleep(0.06)
            consumer.ack(message)
        # What was read ahead is worked through (16 at most, 8 x the prefetch), and a window that still
        # counted fast jobs may read 16 more once; from then on the consumer holds its prefetch.
        over = [i for i, n in enumerate(slow) if n > 2]
        assert not over or over[-1] < 2 * 16, slow
    finally:
        consumer.close()
        broker.close()
        with psycopg.connect(services["dsn"], autocommit=True) as admin:
            admin.execute("select pgmq.drop_queue(%s)", (queue,))


def test_events_emitted_after_a_consumer_closed_are_still_written(services):
    """A pgmq consumer writes its queue's events with its acks and stops the background writer; once it
    has closed, a process that goes on must write its events again instead of keeping them forever."""
    import dramatiq

    from fleet.shared import events as bus
    from fleet.shared.brokers.pgmq import PgmqBroker
    from fleet.shared.config import Settings

    queue = "test_after_close"
    broker = PgmqBroker(settings=Settings(FLEET_BROKER="pgmq"))
    broker.declare_queue(queue)
    broker.enqueue(dramatiq.Message(queue_name=queue, actor_name="nobody", args=({},), kwargs={}, options={}))
    consumer = broker.consume(queue, prefetch=2, timeout=1000)
    consumer.ack(next(consumer))
    consumer.close()
    broker.close()
    trace = str(uuid.uuid4())
    bus.emit("test.after_close", trace_id=trace, queue=queue)
    wait_for(lambda: events(services["dsn"], trace_id=trace), 60, what="the event to be written in the background")
    with psycopg.connect(services["dsn"], autocommit=True) as admin:
        admin.execute("select pgmq.drop_queue(%s)", (queue,))


def test_the_bulk_path_writes_dramatiqs_own_envelope():
    """The producers' bulk path encodes no Message, yet each envelope is what dramatiq itself would write."""
    import dramatiq

    from fleet.shared.brokers.pgmq.sender import payload_envelopes

    payloads = [{"text": "plain"}, {"nested": {"a": [1, 2.5, None, True]}, "quote": 'say "hi" {x}'}, [1, 2]]
    ids: list[tuple[str, str]] = []
    [(queue, bodies)] = list(payload_envelopes("queue_1", "an_actor", payloads, None, 10**6, ids))
    assert queue == "queue_1" and len(bodies) == len(ids) == 3
    for body, payload, (message_id, trace_id) in zip(bodies, payloads, ids, strict=True):
        decoded = dramatiq.Message.decode(body.encode())
        expected = dramatiq.Message(
            queue_name="queue_1",
            actor_name="an_actor",
            args=(payload,),
            kwargs={},
            options={"trace_id": trace_id},
            message_id=message_id,
            message_timestamp=decoded.message_timestamp,
        )
        assert body == expected.encode().decode()  # byte for byte (these payloads are ASCII)


def test_only_middleware_that_declares_it_lets_producers_enqueue_in_bulk(pgmq_fleet):
    from dramatiq.middleware import Middleware

    from fleet.shared.brokers import build_broker

    class SeesEachEnqueue(Middleware):
        def before_enqueue(self, broker, message, delay):
            message.options["seen"] = True

    class DoneInBulk(SeesEachEnqueue):
        enqueue_hooks_done_in_bulk = True

    broker = build_broker()
    try:
        assert broker.can_enqueue_in_bulk()  # the fleet's own middleware all declare it
        broker.add_middleware(DoneInBulk())
        assert broker.can_enqueue_in_bulk()
        broker.add_middleware(SeesEachEnqueue())
        assert not broker.can_enqueue_in_bulk()
    finally:
        broker.close()
