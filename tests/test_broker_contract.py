"""The broker contract, run unchanged on both brokers (pgmq and Redis) against real worker processes."""

from __future__ import annotations

import time

import dramatiq
import pytest

from fleet.shared.errors import InvalidPayload

from .helpers import dead_letters, events, wait_for


def starts(evs):
    return [e for e in evs if e["type"] == "job.started"]


def test_delivery_and_ack(fleet):
    trace = fleet.trace()
    fleet.client.enqueue_many("echo", [{"message": f"m{i}", "record": True} for i in range(40)], trace_id=trace)
    evs = fleet.wait_done(trace, 40)
    done = [e for e in evs if e["type"] == "echo.done"]
    assert sorted(e["payload"]["message"] for e in done) == sorted(f"m{i}" for i in range(40))
    assert len({e["job_id"] for e in evs if e["type"] == "job.succeeded"}) == 40
    # Acknowledged means gone from the broker: a message merely kept invisible by the heartbeat would still
    # be stored (and come back once the heartbeat stops). Acks are batched, so wait for the storage to empty.
    wait_for(lambda: not held_by_broker(fleet, trace), 60, what="the acknowledged messages to leave the broker")
    assert len([e for e in events(fleet.dsn, trace_id=trace) if e["type"] == "job.started"]) == 40


def held_by_broker(fleet, trace: str) -> int:
    """Messages of this trace the broker still stores: pgmq's queue table (visible or not), or Redis's
    message hash (queued, delayed or unacknowledged)."""
    if fleet.kind == "pgmq":
        import psycopg

        with psycopg.connect(fleet.dsn, autocommit=True) as conn:
            return conn.execute(
                "select count(*) from pgmq.q_echo where message->'options'->>'trace_id' = %s", (trace,)
            ).fetchone()[0]
    import redis

    r = redis.Redis.from_url(fleet.env["REDIS_URL"])
    try:
        return sum(trace in (body or b"").decode() for body in r.hvals("dramatiq:echo.msgs"))
    finally:
        r.close()


def test_delay(fleet):
    trace = fleet.trace()
    sent = time.time()
    fleet.client.enqueue("echo", {"message": "later"}, trace_id=trace, delay_ms=1500)
    evs = fleet.wait_done(trace, 1)
    started = starts(evs)[0]["created_at"].timestamp()
    assert started - sent >= 1.4, f"started {started - sent:.2f}s after enqueue"
    assert started - sent < 6


def test_retry_with_backoff_then_dead_letter(fleet):
    trace = fleet.trace()
    fleet.client.enqueue("echo", {"message": "always fails", "fail": "transient"}, trace_id=trace)
    evs = fleet.wait_done(trace, 1)
    attempts = starts(evs)
    assert len(attempts) == 3  # FLEET_MAX_RETRIES=2: one try and two retries
    assert [e["payload"]["attempt"] for e in attempts] == [1, 2, 3]
    gaps = [(b["created_at"] - a["created_at"]).total_seconds() for a, b in zip(attempts, attempts[1:])]
    assert all(g >= 0.09 for g in gaps), gaps  # echo's min_backoff is 200 ms, jittered from half of it
    assert len([e for e in evs if e["type"] == "job.retrying"]) == 2
    (dl,) = dead_letters(fleet.dsn, trace)
    assert dl["reason"].startswith("retries exhausted after 3 attempts: TransientError")
    assert dl["error_class"] == "TransientError"


def test_permanent_error_is_dead_lettered_at_once(fleet):
    trace = fleet.trace()
    fleet.client.enqueue("echo", {"message": "bad input", "fail": "permanent"}, trace_id=trace)
    evs = fleet.wait_done(trace, 1)
    assert len(starts(evs)) == 1
    assert not [e for e in evs if e["type"] == "job.retrying"]
    (dl,) = dead_letters(fleet.dsn, trace)
    assert "permanent error: PermanentError: echo asked to fail permanently: bad input" == dl["reason"]
    dead = [e for e in evs if e["type"] == "job.dead"]
    assert dead and dead[0]["payload"]["error_class"] == "PermanentError"


def test_retry_after_is_honoured(fleet):
    trace = fleet.trace()
    fleet.client.enqueue("echo", {"fail": "transient", "fail_attempts": 1, "retry_after_s": 1.5}, trace_id=trace)
    evs = fleet.wait_done(trace, 1)
    a, b = starts(evs)
    assert (b["created_at"] - a["created_at"]).total_seconds() >= 1.45
    assert [e for e in evs if e["type"] == "job.succeeded"]


def test_wrong_payload_shape_is_dead_lettered_and_worker_keeps_running(fleet):
    trace = fleet.trace()
    # The SDK refuses these (its model is at hand): sent as the messages a producer without it would send.
    for payload in ({"unexpected": 1}, {"sleep_ms": "soon"}, "not an object"):
        with pytest.raises(InvalidPayload):
            fleet.client.enqueue("echo", payload)
        fleet.client.broker.enqueue(fleet.client.message("echo", payload, trace))
    fleet.wait_done(trace, 3)
    reasons = sorted(d["reason"] for d in dead_letters(fleet.dsn, trace))
    assert len(reasons) == 3
    assert all(r.startswith("permanent error: InvalidPayload: invalid echo payload:") for r in reasons), reasons
    assert any("unexpected: Extra inputs are not permitted" in r for r in reasons)
    assert any("sleep_ms" in r for r in reasons)
    ok = fleet.trace()
    fleet.client.enqueue("echo", {"message": "still alive"}, trace_id=ok)
    fleet.wait_done(ok, 1)
    assert fleet.workers.alive()


def test_unknown_actor_is_dead_lettered(fleet):
    trace = fleet.trace()
    message = dramatiq.Message(
        queue_name="echo", actor_name="no_such_actor", args=({},), kwargs={}, options={"trace_id": trace}
    )
    fleet.client.broker.enqueue(message)
    dl = wait_for(lambda: dead_letters(fleet.dsn, trace), 60, what="dead letter")
    assert dl[0]["reason"] == "unknown actor 'no_such_actor'"
    assert fleet.workers.alive()


def test_idempotent_enqueue(fleet):
    trace = fleet.trace()
    key = f"order-{trace}"
    first = fleet.client.enqueue("echo", {"message": "once"}, idempotency_key=key, trace_id=trace)
    second = fleet.client.enqueue("echo", {"message": "once"}, idempotency_key=key, trace_id=trace)
    assert not first.duplicate and second.duplicate
    assert second.job_id == first.job_id
    batch = fleet.client.enqueue_many(
        "echo", [{}, {}, {}], idempotency_keys=[key, key + "b", key + "b"], trace_id=trace
    )
    assert [b.duplicate for b in batch] == [True, False, True]
    fleet.wait_done(trace, 2)
    time.sleep(1.0)
    assert len({e["job_id"] for e in events(fleet.dsn, trace_id=trace, type="job.started")}) == 2


def test_metrics_endpoint_serves_dramatiq_and_fleet_series(fleet):
    import httpx

    trace = fleet.trace()
    fleet.client.enqueue_many("echo", [{"message": "m"}] * 5 + [{"fail": "permanent"}], trace_id=trace)
    fleet.client.enqueue("echo", {"message": "waiting"}, trace_id=fleet.trace(), delay_ms=60_000)
    fleet.wait_done(trace, 6)
    base = f"http://127.0.0.1:{fleet.workers.metrics_port}"

    def scrape():
        text = httpx.get(f"{base}/metrics", timeout=5).text
        return text if 'fleet_jobs_total{actor="echo",outcome="dead",queue="echo"}' in text else None

    text = wait_for(scrape, 60, what="the dead-letter outcome in /metrics")
    for series in (
        "dramatiq_messages_total",
        "dramatiq_message_errors_total",
        "dramatiq_message_rejects_total",
        "dramatiq_message_duration_milliseconds_bucket",
        "dramatiq_messages_inprogress",
        "fleet_job_duration_seconds_bucket",
        "fleet_worker_processes",
        "fleet_broker_up 1.0",
    ):
        assert series in text, series
    depth = [line for line in text.splitlines() if line.startswith('fleet_queue_depth{queue="echo"}')]
    assert depth and float(depth[0].split()[-1]) >= 1.0  # the delayed job is waiting
    assert 'fleet_queue_oldest_age_seconds{queue="echo"}' in text
    assert 'fleet_dead_letters{queue="echo"}' in text
    assert 'fleet_jobs_total{actor="echo",outcome="succeeded",queue="echo"}' in text
    assert httpx.get(f"{base}/healthz").status_code == 200
    ready = httpx.get(f"{base}/readyz")
    assert ready.status_code == 200 and ready.text.splitlines()[0] == "ready"


REFUSE_DEAD_LETTER = """
create or replace function test_refuse_dead_letter() returns trigger language plpgsql as $$
begin
    raise exception 'dead_letters refuses this row (test)' using errcode = 'check_violation';
end $$;
create trigger test_refuse_dead_letter before insert on dead_letters for each row
    when (new.reason like '%refuse-this-dead-letter%') execute function test_refuse_dead_letter();
"""


def test_a_dead_letter_that_cannot_be_written_keeps_its_message(fleet):
    """A failed dead_letters write must not let the message go (archived on pgmq, dramatiq's DQ on Redis)
    without its row: the nack waits and is tried again until the row is written."""
    import psycopg

    trace = fleet.trace()
    with psycopg.connect(fleet.dsn, autocommit=True) as conn:
        conn.execute(REFUSE_DEAD_LETTER)
        try:
            fleet.client.enqueue("echo", {"message": "refuse-this-dead-letter", "fail": "permanent"}, trace_id=trace)
            wait_for(
                lambda: (
                    "dead_letter.record_failed" in fleet.workers.logs() and starts(events(fleet.dsn, trace_id=trace))
                ),
                60,
                what="the dead-letter write to fail",
            )
            time.sleep(1.0)  # the old code archived the message right after the failed write
            assert dead_letters(fleet.dsn, trace) == []
            assert _still_held(fleet, conn), "the message left its queue without a dead letter"
        finally:
            conn.execute("drop trigger if exists test_refuse_dead_letter on dead_letters")
        (dl,) = wait_for(lambda: dead_letters(fleet.dsn, trace), 60, what="the dead letter once it can be written")
        assert dl["reason"].startswith("permanent error: PermanentError: echo asked to fail permanently")
        evs = fleet.wait_done(trace, 1)  # its job.dead event commits with the nack
        assert len([e for e in evs if e["type"] == "job.dead"]) == 1
        assert len(starts(evs)) == 1  # held, not run again


def _still_held(fleet, conn) -> bool:
    """The message is still the broker's: in pgmq's queue table (not archived), or in a Redis ack set."""
    if fleet.kind == "pgmq":
        return bool(
            conn.execute(
                "select count(*) from pgmq.q_echo where message->'args'->0->>'message' = 'refuse-this-dead-letter'"
            ).fetchone()[0]
        )
    import redis

    r = redis.Redis.from_url(fleet.env["REDIS_URL"])
    try:
        return any(r.scard(key) for key in r.scan_iter("dramatiq:__acks__.*"))
    finally:
        r.close()


REFUSE_RELEASE = """
create or replace function test_refuse_release() returns trigger language plpgsql as $$
begin
    raise exception 'request_dedup refuses this delete (test: the database went away)';
end $$;
create trigger test_refuse_release before delete on request_dedup for each row
    when (old.key like 'refuse-release-%') execute function test_refuse_release();
create or replace function test_refuse_send() returns trigger language plpgsql as $$
begin
    raise exception 'the queue refuses this send (test)';
end $$;
create trigger test_refuse_send before insert on pgmq.q_echo for each row
    when (new.message->'args'->0->>'message' = 'refuse-this-send') execute function test_refuse_send();
"""


def test_idempotency_key_of_a_send_that_failed_is_not_left_claimed(fleet):
    """The key is claimed, the send fails and so does the key's release (the producer died, or the database
    went away). pgmq: claim and send are one transaction, so nothing stays claimed; Redis: the claim was
    pending and expires quickly. Either way the same key then enqueues the job, which runs."""
    import psycopg

    from .conftest import make_client

    trace = fleet.trace()
    key = f"refuse-release-{trace}"
    failing = make_client(fleet.kind, **({"REDIS_URL": "redis://127.0.0.1:9/0"} if fleet.kind == "redis" else {}))
    failing.pending_ttl_s = 1.0
    with psycopg.connect(fleet.dsn, autocommit=True) as conn:
        conn.execute(REFUSE_RELEASE)
        try:
            with pytest.raises(Exception):
                failing.enqueue("echo", {"message": "refuse-this-send"}, idempotency_key=key, trace_id=trace)
        finally:
            conn.execute(
                "drop trigger if exists test_refuse_release on request_dedup;"
                " drop trigger if exists test_refuse_send on pgmq.q_echo"
            )
            failing.broker.close()
        left = conn.execute(
            "select expires_at - now() from request_dedup where scope = 'enqueue' and key = %s", (key,)
        ).fetchone()
    assert left is None or left[0].total_seconds() <= 1.0, f"the key stays claimed for {left[0]}"
    time.sleep(1.1)  # a pending claim's lifetime
    again = fleet.client.enqueue("echo", {"message": "sent at last"}, idempotency_key=key, trace_id=trace)
    assert not again.duplicate
    fleet.wait_done(trace, 1)


def test_two_live_copies_of_a_retried_attempt_run_once(fleet):
    """A retry enqueued before its attempt was acknowledged, then the attempt run again (a worker killed in
    between, or an ack lost in a crash), makes two copies of the next attempt: only the first to start runs."""
    trace = fleet.trace()
    message = fleet.client.message("echo", {"message": "second attempt", "record": True}, trace)
    message.options["retries"] = 1  # attempt 2, as ClassifiedRetries enqueues it
    fleet.client.broker.enqueue(message)
    fleet.client.broker.enqueue(message)  # the diverging copy: same job and attempt, another broker message
    evs = wait_for(
        lambda: (lambda e: e if {"job.succeeded", "job.skipped"} <= {x["type"] for x in e} else None)(
            events(fleet.dsn, trace_id=trace)
        ),
        60,
        what="one copy to run and one to be skipped",
    )
    time.sleep(0.5)
    evs = events(fleet.dsn, trace_id=trace)
    assert len([e for e in evs if e["type"] == "echo.done"]) == 1
    assert len([e for e in evs if e["type"] == "job.skipped"]) == 1
