"""On Redis, a job's ack waits for its bus_events to commit, and the events are written in batches by one
writer per worker process (shared/brokers/redis.py): real worker processes, real Redis, real Postgres."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest
import redis

from .conftest import make_client, worker_env
from .helpers import WorkerGroup, events, wait_for

THREADS = 2
JOBS = 2 * THREADS  # dramatiq's Redis prefetch is 2 x threads: every job is taken at once


def unacked(env: dict, trace: str) -> int:
    """Messages of this trace still in Redis (waiting or delivered, not acknowledged)."""
    r = redis.Redis.from_url(env["REDIS_URL"])
    try:
        return sum(1 for body in r.hvals("dramatiq:echo.msgs") if json.loads(body)["options"].get("trace_id") == trace)
    finally:
        r.close()


def holding(group: WorkerGroup) -> int:
    """How many acks the worker's writer said it holds, last time it said so."""
    held = [
        json.loads(line)["messages"]
        for line in group.logs().splitlines()
        if line.startswith("{") and '"acks.held"' in line
    ]
    return held[-1] if held else 0


@pytest.fixture
def refused_events(services):
    """bus_events refuses this trace's rows (a row trigger that raises) until release() is called."""
    trace = str(uuid.uuid4())
    fn, trigger = f"refuse_{trace[:8]}", f"refuse_{trace[:8]}_trg"
    dsn = services["dsn"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"create function {fn}() returns trigger language plpgsql as $$ begin"
            f" if new.trace_id = '{trace}'::uuid then raise exception 'bus_events refused for the test'; end if;"
            f" return new; end $$"
        )
        conn.execute(f"create trigger {trigger} before insert on bus_events for each row execute function {fn}()")

    def release():
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"drop trigger if exists {trigger} on bus_events")
            conn.execute(f"drop function if exists {fn}()")

    try:
        yield trace, release
    finally:
        release()


def test_no_ack_before_its_events_commit_and_worker_threads_do_not_wait_for_them(services, refused_events, tmp_path):
    trace, release = refused_events
    env = worker_env(services, "redis")
    client = make_client("redis")
    group = WorkerGroup(env, threads=THREADS, log_dir=tmp_path).start()
    try:
        client.enqueue_many("echo", [{"message": f"held {i}"} for i in range(JOBS)], trace_id=trace)
        # Every job ran: the writer holds all their acks while their events are refused. The worker threads
        # went on to the next job instead of waiting on Postgres, so more jobs ran than there are threads.
        wait_for(lambda: holding(group) == JOBS, 30, what=f"the writer to hold the acks of all {JOBS} jobs")
        assert unacked(env, trace) == JOBS, "a message was acknowledged while its events were refused"
        assert events(services["dsn"], trace_id=trace) == []

        release()
        done = wait_for(
            lambda: (lambda e: e if len({x["job_id"] for x in e if x["type"] == "job.succeeded"}) == JOBS else None)(
                events(services["dsn"], trace_id=trace)
            ),
            30,
            what="the held events",
        )
        wait_for(lambda: unacked(env, trace) == 0, 30, what="the acks once their events committed")
        assert {e["type"] for e in done} == {"job.started", "job.succeeded"}
        # The held batch commits as one statement: every job's rows share its transaction.
        with psycopg.connect(services["dsn"], autocommit=True) as conn:
            commits = conn.execute(
                "select count(distinct xmin::text) from bus_events where trace_id = %s", (trace,)
            ).fetchone()[0]
        assert commits == 1
    finally:
        assert group.terminate() == 0, group.logs()[-3000:]
        client.broker.close()


def test_a_graceful_stop_commits_the_held_acks(services, tmp_path):
    env = worker_env(services, "redis")
    client = make_client("redis")
    trace = str(uuid.uuid4())
    group = WorkerGroup(env, threads=THREADS, log_dir=tmp_path).start()
    try:
        client.enqueue_many("echo", [{"message": f"stop {i}", "sleep_ms": 50} for i in range(20)], trace_id=trace)
        wait_for(
            lambda: len({e["job_id"] for e in events(services["dsn"], trace_id=trace, type="job.succeeded")}) >= 3,
            30,
            what="some jobs to finish",
        )
    finally:
        assert group.terminate() == 0, group.logs()[-3000:]
        client.broker.close()
    succeeded = {e["job_id"] for e in events(services["dsn"], trace_id=trace, type="job.succeeded")}
    # Every job that finished is acknowledged (none left to run again); the rest were requeued unstarted.
    assert unacked(env, trace) == 20 - len(succeeded)


def test_events_go_back_to_the_background_writer_once_the_broker_is_closed(services):
    from fleet.shared import events as bus

    client = make_client("redis")
    consumer = client.broker.consume("echo")  # a consumer: its process's events wait for the ack writer
    assert not bus._writer.background
    client.broker.close()
    assert consumer.writer.is_alive() is False
    trace = str(uuid.uuid4())
    bus.emit("test.after_close", trace_id=trace)  # nothing acks any more: the background writer takes it
    wait_for(lambda: events(services["dsn"], trace_id=trace), 60, what="the event emitted after the close")


def test_a_stopping_consumer_puts_back_what_it_fetched_but_never_handed_out(services):
    """dramatiq's Redis consumer fetches a batch and hands it out one message at a time. A graceful stop
    must put the rest of the batch back in the queue at once, not leave it in the worker's ack set until
    the heartbeat timeout."""
    from dramatiq import Message

    from fleet.shared.brokers.redis import FleetRedisBroker

    broker = FleetRedisBroker(url=services["redis_url"])
    queue = f"unread_{uuid.uuid4().hex[:8]}"
    broker.declare_queue(queue)
    r = redis.Redis.from_url(services["redis_url"])
    try:
        for i in range(5):
            broker.enqueue(Message(queue_name=queue, actor_name="echo", args=(), kwargs={"i": i}, options={}))
        consumer = broker.consume(queue, prefetch=5, timeout=100)
        taken = next(consumer)
        assert taken is not None and r.llen(f"dramatiq:{queue}") == 0  # all 5 fetched, one handed out
        consumer.close()
        back = set(r.lrange(f"dramatiq:{queue}", 0, -1))
        assert len(back) == 4 and taken.options["redis_message_id"].encode() not in back
    finally:
        r.delete(f"dramatiq:{queue}", f"dramatiq:{queue}.msgs", *r.keys(f"dramatiq:__acks__.*.{queue}"))
        r.close()
        broker.close()
