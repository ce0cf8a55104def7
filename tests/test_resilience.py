"""Crashes and shutdowns: nothing is lost on either broker."""

from __future__ import annotations

import time

import psycopg
import pytest

from .conftest import make_client, worker_env
from .helpers import WorkerGroup, events, fleet_cli, wait_for


@pytest.fixture(params=["pgmq", "redis"])
def kind(request):
    return request.param


def _distinct(evs, type_):
    return {e["job_id"] for e in evs if e["type"] == type_}


def test_sigkilled_worker_message_is_redelivered_within_one_visibility_timeout(services, kind, tmp_path):
    env = worker_env(services, kind)  # FLEET_VISIBILITY_TIMEOUT_S=4
    client = make_client(kind)
    dsn = services["dsn"]
    trace = "00000000-0000-4000-8000-%012d" % int(time.time() * 1000 % 10**12)
    first = WorkerGroup(env, threads=2, log_dir=tmp_path).start()
    try:
        client.enqueue_many(
            "echo", [{"message": f"long {i}", "sleep_ms": 1500, "record": True} for i in range(4)], trace_id=trace
        )
        wait_for(lambda: len(_distinct(events(dsn, trace_id=trace), "job.started")) >= 2, 30, what="jobs to start")
        first.kill()
        killed_at = time.time()
        second = WorkerGroup(env, threads=4, log_dir=tmp_path).start()
        ready_after = time.time() - killed_at  # a loaded machine may boot the second group after the vt is over
        try:
            evs = wait_for(
                lambda: (lambda e: e if len(_distinct(e, "job.succeeded")) == 4 else None)(events(dsn, trace_id=trace)),
                40,
                what="all four jobs to succeed after the kill",
            )
        finally:
            assert second.terminate() == 0
        done = [e for e in evs if e["type"] == "echo.done"]
        assert sorted(e["payload"]["message"] for e in done) == [f"long {i}" for i in range(4)]
        redelivered_after = max(e["created_at"].timestamp() for e in done) - killed_at
        # one visibility timeout (4 s), or the second group's boot if that took longer, plus the job itself
        # (1.5 s) and pickup slack; a message that waited for anything else (a second vt) shows
        assert redelivered_after < max(4, ready_after) + 1.5 + 10, (redelivered_after, ready_after)
    finally:
        first.kill()
        client.broker.close()


def test_sigterm_drains_or_requeues_and_loses_nothing(services, kind, tmp_path):
    # A visibility timeout far longer than the test: on pgmq a message the stop did not put back stays
    # invisible past the check below, however long the stop takes.
    env = worker_env(services, kind, FLEET_VISIBILITY_TIMEOUT_S="120")
    client = make_client(kind)
    dsn = services["dsn"]
    trace = "00000000-0000-4000-9000-%012d" % int(time.time() * 1000 % 10**12)
    n = 30
    group = WorkerGroup(env, threads=4, log_dir=tmp_path).start()
    client.enqueue_many(
        "echo", [{"message": f"j{i}", "sleep_ms": 300, "record": True} for i in range(n)], trace_id=trace
    )
    wait_for(lambda: len(_distinct(events(dsn, trace_id=trace), "job.succeeded")) >= 4, 30, what="some jobs to finish")
    assert group.terminate(timeout=60) == 0, group.logs()[-2000:]
    before = _distinct(events(dsn, trace_id=trace), "job.succeeded")
    assert len(before) < n, "the group should have been stopped mid-load"
    # The prefetched jobs went back at once: every unfinished job can be taken now that the group has stopped,
    # not after the 120 s visibility timeout (pgmq: its vt has passed; Redis: it is back in the queue's list,
    # where nothing but a requeue puts it before a new worker starts).
    ready = _ready_to_take(kind, dsn, env, trace)
    assert ready == n - len(before), f"{ready} of {n - len(before)} unfinished jobs could be taken at once"
    restart = WorkerGroup(env, threads=4, log_dir=tmp_path).start()
    try:
        evs = wait_for(
            lambda: (lambda e: e if len(_distinct(e, "job.succeeded")) == n else None)(events(dsn, trace_id=trace)),
            60,
            what="every job to succeed after the restart",
        )
    finally:
        assert restart.terminate() == 0
        client.broker.close()
    messages = [e["payload"]["message"] for e in evs if e["type"] == "echo.done"]
    assert sorted(set(messages)) == sorted(f"j{i}" for i in range(n))
    # graceful stop: in-flight jobs finished before the exit, so none ran twice
    assert len(messages) == n


def test_max_backoff_setting_caps_every_actors_backoff(services, tmp_path):
    """echo's own range is 200-5000 ms; FLEET_MAX_BACKOFF_MS=300 must cap each retry delay at 300 ms."""
    env = worker_env(services, "pgmq", FLEET_MAX_BACKOFF_MS="300", FLEET_MAX_RETRIES="6")
    client = make_client("pgmq")
    trace = "00000000-0000-4000-8000-%012d" % int(time.time() * 1000 % 10**12)
    group = WorkerGroup(env, threads=2, log_dir=tmp_path).start()
    try:
        client.enqueue("echo", {"message": "always fails", "fail": "transient"}, trace_id=trace)
        evs = wait_for(
            lambda: (lambda e: e if any(x["type"] == "job.dead" for x in e) else None)(
                events(services["dsn"], trace_id=trace)
            ),
            30,
            what="the job to exhaust its retries",
        )
        delays = [e["payload"]["delay_ms"] for e in evs if e["type"] == "job.retrying"]
        assert len(delays) == 6
        assert all(100 <= d <= 300 for d in delays), delays
    finally:
        assert group.terminate() == 0
        client.broker.close()


def test_retry_not_lost_when_the_broker_stays_down_past_the_budget(services, kind, tmp_path):
    """The broker is down when a job's retry is enqueued, for longer than FLEET_UNREACHABLE_BUDGET_S. On
    Redis the original's ack must wait until the retry is enqueued; on pgmq the original is left
    unacknowledged and delivered again. Either way the job runs again and succeeds once the broker is back.
    The broker here is a PostgreSQL or Redis of the test's own, so stopping it leaves the others alone."""
    from fleet.shared.migrate import migrate
    from fleet.shared.services import EmbeddedPostgres, EmbeddedRedis

    if kind == "pgmq":
        broker_service = EmbeddedPostgres(tmp_path / "own-pg")
        dsn = broker_service.up()
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn)
        env = worker_env(services, kind, DATABASE_URL=dsn)
    else:
        broker_service, dsn = EmbeddedRedis(tmp_path / "own-redis"), services["dsn"]
        env = worker_env(services, kind, REDIS_URL=broker_service.up())
    env["FLEET_UNREACHABLE_BUDGET_S"] = "1"
    trace = "00000000-0000-4000-8000-%012d" % int(time.time() * 1000 % 10**12)
    group = WorkerGroup(env, threads=2, log_dir=tmp_path).start()
    try:
        fleet_cli(
            "enqueue",
            "echo",
            '{"fail": "transient", "fail_attempts": 1, "sleep_ms": 2000}',
            "--trace-id",
            trace,
            env=env,
        )
        wait_for(lambda: _taken(kind, dsn, env), 60, what="a worker to take the job")
        broker_service.down()
        # (on pgmq the enqueue also waits out the connection pool's 30 s timeout; a loaded machine takes longer)
        wait_for(lambda: "job.retry_not_enqueued" in group.logs(), 150, what="the retry enqueue to give up")
        time.sleep(2)  # the message is held back (Redis: the ack waits; pgmq: not acknowledged)
        broker_service.up()
        evs = wait_for(
            lambda: (lambda e: e if _distinct(e, "job.succeeded") else None)(events(dsn, trace_id=trace)),
            40,
            what="the job to succeed once the broker is back",
        )
        assert len(_distinct(evs, "job.succeeded")) == 1
        assert len([e for e in evs if e["type"] == "job.started"]) >= 2  # the failed attempt and the one after
    finally:
        group.terminate()
        broker_service.down()


def _ready_to_take(kind: str, dsn: str, env: dict, trace: str) -> int:
    """Messages of this trace a worker can read now: pgmq's visibility time has passed (the stop's set_vt 0;
    unreturned ones stay invisible for a visibility timeout after their last heartbeat), or they are in the
    Redis queue's list."""
    if kind == "pgmq":
        with psycopg.connect(dsn, autocommit=True) as conn:
            return conn.execute(
                "select count(*) from pgmq.q_echo where message->'options'->>'trace_id' = %s"
                " and vt <= clock_timestamp()",
                (trace,),
            ).fetchone()[0]
    import redis

    r = redis.Redis.from_url(env["REDIS_URL"])
    try:
        queued = set(r.lrange("dramatiq:echo", 0, -1))
        return sum(trace in (r.hget("dramatiq:echo.msgs", mid) or b"").decode() for mid in queued)
    finally:
        r.close()


def _taken(kind: str, dsn: str, env: dict) -> bool:
    """The echo message is in a worker's hands: read once from pgmq, or in a Redis consumer's ack set."""
    if kind == "pgmq":
        with psycopg.connect(dsn, autocommit=True) as conn:
            return bool(conn.execute("select count(*) from pgmq.q_echo where read_ct > 0").fetchone()[0])
    import redis

    r = redis.Redis.from_url(env["REDIS_URL"])
    try:
        return any(r.scard(key) for key in r.scan_iter("dramatiq:__acks__.*"))
    finally:
        r.close()


HEARTBEAT_BLOCK = """
create table if not exists test_heartbeat_block (on_ boolean);
create or replace function test_refuse_heartbeat() returns trigger language plpgsql as $$
begin
    if exists (select 1 from test_heartbeat_block) then
        raise exception 'heartbeat refused (test: the database is restarting)';
    end if;
    return new;
end $$;
drop trigger if exists test_refuse_heartbeat on agent_upgrades;
create trigger test_refuse_heartbeat before update on agent_upgrades for each row
    when (old.agent_id like 'lease-test-%') execute function test_refuse_heartbeat();
"""


@pytest.fixture
def leased_agent(services):
    """An agent upgrade attempt that is `running` under a live lease, as a first copy of the job leaves it."""
    import uuid

    from fleet.workers.agents.templates import publish

    from .test_templates import AGENT

    name, agent = f"lease-{uuid.uuid4().hex[:8]}", f"lease-test-{uuid.uuid4().hex[:8]}"
    publish(name, "1.0.0", AGENT)
    with psycopg.connect(services["dsn"], autocommit=True) as conn:
        run = conn.execute(
            "insert into upgrade_runs (template_name, to_version, dry_run, status)"
            " values (%s, '1.0.0', false, 'running') returning id::text",
            (name,),
        ).fetchone()[0]
        lease = conn.execute(
            "insert into agent_upgrades (run_id, agent_id, from_version, to_version, dry_run, status,"
            " lease, heartbeat_at, attempts) values (%s, %s, '0.9.0', '1.0.0', false, 'running',"
            " gen_random_uuid(), now(), 1) returning lease::text",
            (run, agent),
        ).fetchone()[0]
        conn.execute(HEARTBEAT_BLOCK)
        try:
            yield conn, run, agent, lease
        finally:  # a running row left behind would be requeued by any later requeue_stale
            conn.execute(
                "drop trigger if exists test_refuse_heartbeat on agent_upgrades; drop table test_heartbeat_block"
            )
            conn.execute("delete from agent_upgrades where run_id = %s", (run,))
            conn.execute("delete from upgrade_runs where id = %s", (run,))


def test_a_second_copy_cannot_take_an_agent_whose_upgrade_lease_is_live(leased_agent):
    from fleet.shared.config import Settings
    from fleet.shared.errors import DeferredError
    from fleet.workers.agents.upgrades import upgrade_one

    conn, run, agent, lease = leased_agent
    with pytest.raises(DeferredError, match="another attempt holds the upgrade"):
        upgrade_one(run, agent, Settings(), {})
    assert conn.execute(
        "select status, attempts, lease::text from agent_upgrades where run_id = %s and agent_id = %s", (run, agent)
    ).fetchone() == ("running", 1, lease)


def test_the_upgrade_heartbeat_survives_database_errors_and_the_fence_sees_a_lost_lease(leased_agent):
    from fleet.workers.agents.upgrades import Heartbeat, LeaseLost

    conn, run, agent, lease = leased_agent
    conn.execute("insert into test_heartbeat_block values (true)")
    before = conn.execute("select heartbeat_at from agent_upgrades where agent_id = %s", (agent,)).fetchone()[0]
    heartbeat = Heartbeat(run, agent, lease, 0.2)
    heartbeat.start()
    try:
        time.sleep(1.0)  # five beats refused
        assert heartbeat.is_alive()
        conn.execute("delete from test_heartbeat_block")
        wait_for(
            lambda: conn.execute(
                "select heartbeat_at > %s from agent_upgrades where agent_id = %s", (before, agent)
            ).fetchone()[0],
            60,
            what="a beat once the database answers",
        )
        heartbeat.fence()  # still ours
        conn.execute("update agent_upgrades set lease = gen_random_uuid() where agent_id = %s", (agent,))  # taken over
        with pytest.raises(LeaseLost):
            heartbeat.fence()
    finally:
        heartbeat.stop()


def test_every_thread_busy_replaying_chats_does_not_exhaust_the_connection_pool(services, sim, tmp_path):
    """12 threads replay stored chat answers at once. Each replay publishes frames, which takes a pooled
    connection; the old code held its first connection and transaction meanwhile, and with a pool of 10 the
    threads waited on each other until the pool's 30 s timeout. Now no connection is held across publishing
    or a provider call, and a worker's pool is sized from its threads."""
    import uuid

    from .embedding_support import API_KEY

    env = worker_env(
        services, "pgmq", CHAT_API_BASE=f"{sim.url}/v1", CHAT_API_KEY=API_KEY, CHAT_MODEL_DEFAULT="sim-chat"
    )
    client = make_client("pgmq")
    chats = [
        {"session_id": str(uuid.uuid4()), "content": f"q{i}", "idempotency_key": f"busy-{uuid.uuid4()}"}
        for i in range(24)
    ]
    with psycopg.connect(services["dsn"], autocommit=True) as conn:  # an earlier test may have left it "down"
        conn.execute("delete from provider_health where provider = 'chat'")
    group = WorkerGroup(env, threads=12, log_dir=tmp_path).start()
    try:
        first = "00000000-0000-4000-8000-%012d" % int(time.time() * 1000 % 10**12)
        client.enqueue_many("chat_completion", chats, trace_id=first)
        wait_for(
            lambda: len(_distinct(events(services["dsn"], trace_id=first), "job.succeeded")) == 24,
            60,
            what="the first answers",
        )
        again = "00000000-0000-4000-9000-%012d" % int(time.time() * 1000 % 10**12)
        started = time.monotonic()
        client.enqueue_many("chat_completion", chats, trace_id=again)
        evs = wait_for(
            lambda: (lambda e: e if len(_distinct(e, "job.succeeded")) == 24 else None)(
                events(services["dsn"], trace_id=again)
            ),
            60,
            what="the replays",
        )
        elapsed = time.monotonic() - started
        assert not [e for e in evs if e["type"] in ("job.retrying", "job.dead")]
        # a thread that waited for a pooled connection would have waited out the pool's 30 s timeout
        assert elapsed < 30, f"24 replays took {elapsed:.1f}s (the pool's timeout is 30 s)"
        assert "PoolTimeout" not in group.logs()
    finally:
        assert group.terminate() == 0
        client.broker.close()


def test_an_attempt_whose_lease_was_taken_over_does_not_record_its_outcome(leased_agent, services):
    """The final status is written only under the attempt's own lease: a copy superseded after its PATCH
    check (its worker stalled past the stale limit) cannot record `failed` over the live holder's work."""
    import uuid

    from psycopg.rows import dict_row

    from fleet.workers.agents.upgrades import _finish

    conn, run, agent, lease = leased_agent
    row = {"run_id": run, "agent_id": agent, "dry_run": False}
    with psycopg.connect(services["dsn"], autocommit=True) as own, own.cursor(row_factory=dict_row) as cur:
        assert _finish(cur, row, "failed", None, "stalled", {}, lease=str(uuid.uuid4())) == "superseded"
        assert conn.execute("select status from agent_upgrades where agent_id = %s", (agent,)).fetchone() == (
            "running",
        )
        assert _finish(cur, row, "succeeded", {}, None, {}, lease=lease) == "succeeded"
    assert conn.execute("select status from agent_upgrades where agent_id = %s", (agent,)).fetchone() == ("succeeded",)
