"""A consumer whose connection the database ends (a pooler recycling it, a failover, pg_terminate_backend)
reconnects by itself at once: dramatiq's fixed 3 s consumer restart is not involved, the fault is a warning
with its SQLSTATE, and the reconnect is counted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import Counter

import httpx
import psycopg

from fleet.ops.processes import stop_process

from .conftest import make_client, worker_env
from .helpers import ROOT, WorkerGroup, events, wait_for


def _succeeded(dsn: str, trace: str) -> bool:
    return any(e["type"] == "job.succeeded" for e in events(dsn, trace_id=trace))


def _terminate_consumers(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as admin:
        return len(
            admin.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity where pid <> pg_backend_pid()"
                " and (query like %s or query like %s or application_name = 'fleet-notifier')",
                # a consumer's round trip or its idle wait's look at vt, and the LISTEN connection
                ("%fleet_ack_and_read(%", "%min(vt) - clock_timestamp()%"),
            ).fetchall()
        )


def test_a_terminated_consumer_connection_is_replaced_without_a_consumer_restart(services, tmp_path):
    dsn = services["dsn"]
    client = make_client("pgmq")
    group = WorkerGroup(worker_env(services, "pgmq"), threads=2, metrics=True, log_dir=tmp_path).start()
    try:
        first = str(uuid.uuid4())
        client.enqueue("echo", {"message": "before"}, trace_id=first)
        wait_for(lambda: _succeeded(dsn, first), 60, what="a job before the kill")
        assert _terminate_consumers(dsn) >= 1
        after = str(uuid.uuid4())
        client.enqueue("echo", {"message": "after"}, trace_id=after)
        wait_for(lambda: _succeeded(dsn, after), 60, what="a job after the kill")
        logs = group.logs()
        assert "db.connection_lost" in logs and "57P01" in logs, logs[-3000:]  # admin_shutdown
        assert "Consumer encountered a connection error" not in logs and "Restarting consumer" not in logs
        assert "fleet_ack_and_read" not in logs  # no SQL text in the warning

        def reconnected() -> set[str] | None:  # the metrics server is a process of its own: it may still be binding
            try:
                text = httpx.get(f"http://127.0.0.1:{group.metrics_port}/metrics", timeout=30).text
            except httpx.TransportError:
                return None
            counted = {
                line.split('connection="')[1].split('"')[0]
                for line in text.splitlines()
                if line.startswith("fleet_db_reconnects_total{")
                and 'role="worker"' in line
                and float(line.rsplit(" ", 1)[1]) >= 1
            }
            return counted if "notifier" in counted and "consumer:echo" in counted else None

        wait_for(reconnected, 60, 0.2, "the consumer's and the notifier's reconnects in /metrics")
    finally:
        assert group.terminate() == 0
        client.broker.close()


def _metric(text: str, connection: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("fleet_db_reconnects_total{") and f'connection="{connection}"' in line
    )


def _scrape(port: int) -> str | None:
    try:  # the metrics server is a process of its own: it may still be binding
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    except httpx.TransportError:
        return None


def _lost(logs: str) -> list[dict]:
    """The connection-lost warnings in a process's JSON log lines."""
    return [json.loads(line) for line in logs.splitlines() if '"db.connection_lost"' in line]


def _wait_counted(group: WorkerGroup, connection: str) -> None:
    wait_for(
        lambda: (text := _scrape(group.metrics_port)) and _metric(text, connection) >= 1,
        60,
        0.2,
        f"the reconnect of {connection} in /metrics",
    )


def _kill_insert_in_flight(dsn: str, statement: str = "%fleet_insert_events(%", meanwhile=lambda: None) -> None:
    """Terminate a fleet backend in the middle of inserting bus_events: the table is locked so the insert
    (a statement like `statement`) waits, its backend (found in pg_stat_activity) is terminated, and the
    lock is let go."""
    with psycopg.connect(dsn) as locker, psycopg.connect(dsn, autocommit=True) as admin:
        locker.execute("lock table bus_events in exclusive mode")  # reads go on; inserts wait
        meanwhile()  # what makes the fleet write events (jobs enqueued while the table is locked)

        def blocked() -> list[int]:
            return [
                r[0]
                for r in admin.execute(
                    "select pid from pg_stat_activity where application_name = 'fleet' and wait_event_type = 'Lock'"
                    " and query like %s",
                    (statement,),
                ).fetchall()
            ]

        pids = wait_for(blocked, 60, what="an insert into bus_events waiting for the lock")
        for pid in pids:
            admin.execute("select pg_terminate_backend(%s)", (pid,))
        locker.rollback()


EMITTER = """
import sys, time
from fleet.shared.logs import configure_logging
configure_logging("INFO")
from fleet.shared import events
from fleet.shared.metrics import metrics
trace, count = sys.argv[1], int(sys.argv[2])
for i in range(count):
    events.emit("reconnect.probe", trace_id=trace, seq=i)
    time.sleep(0.02)
while events._writer._buffer:  # the background writer's last rows
    time.sleep(0.05)
time.sleep(0.2)
print("reconnects", metrics().db_reconnects.labels("worker", "events")._value.get(), flush=True)
"""


def test_the_event_writer_reconnects_at_once_and_loses_no_event(services, tmp_path):
    """A process's background event writer (a producer's, the gateway's) whose backend is terminated mid-insert
    puts its rows back and writes them on a new connection: every event arrives once, the loss is a warning
    with its SQLSTATE, and the reconnect is counted."""
    dsn, trace, count = services["dsn"], str(uuid.uuid4()), 150
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with open(tmp_path / "emitter.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", EMITTER, trace, str(count)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
        )
        try:
            for kills in range(3):
                wait_for(lambda: len(events(dsn, trace_id=trace)) > 20 * (kills + 1), 60, what="events to arrive")
                _kill_insert_in_flight(dsn)
            assert proc.wait(120) == 0
        finally:
            stop_process(proc, 10)
    logs = (tmp_path / "emitter.log").read_text()
    seqs = sorted(e["payload"]["seq"] for e in events(dsn, trace_id=trace))
    assert seqs == list(range(count)), f"{len(seqs)} events of {count}:\n{logs[-3000:]}"
    lost = _lost(logs)
    assert len(lost) == 3 and {(w["connection"], w["sqlstate"], w["level"]) for w in lost} == {
        ("events", "57P01", "warning")
    }, logs[-3000:]
    assert "events.flush_failed" not in logs and "fleet_insert_events" not in logs
    assert "reconnects 3.0" in logs, logs[-3000:]


def _echo_jobs(client, trace: str, numbers: range) -> None:
    for i in numbers:
        client.enqueue("echo", {"message": f"job {i}"}, trace_id=trace)


def _wait_succeeded(dsn: str, trace: str, count: int) -> list[dict]:
    wait_for(
        lambda: sum(e["type"] == "job.succeeded" for e in events(dsn, trace_id=trace)) >= count,
        60,
        what="every job to succeed",
    )
    return events(dsn, trace_id=trace)


def test_acks_and_events_a_pgmq_consumer_holds_when_its_connection_dies_are_committed_after_the_reconnect(
    services, tmp_path
):
    """The consumer's round trip that carries its acks and the jobs' events is terminated mid-flight (it waits
    on a lock): the consumer keeps both, sends them on its new connection, and no message comes back after
    its visibility timeout (each job started once), and none is left in the queue."""
    dsn = services["dsn"]
    client = make_client("pgmq")
    group = WorkerGroup(worker_env(services, "pgmq"), threads=2, metrics=False, log_dir=tmp_path).start()
    try:
        trace = str(uuid.uuid4())
        _kill_insert_in_flight(dsn, "%fleet_ack_and_read(%", lambda: _echo_jobs(client, trace, range(6)))
        evs = _wait_succeeded(dsn, trace, 6)
        assert sorted(Counter(e["type"] for e in evs).items()) == [("job.started", 6), ("job.succeeded", 6)], evs
        with psycopg.connect(dsn, autocommit=True) as conn:
            left = conn.execute(
                "select count(*) from pgmq.q_echo where message->'options'->>'trace_id' = %s", (trace,)
            ).fetchone()[0]
        assert left == 0  # acknowledged, not waiting out a visibility timeout
        logs = group.logs()
        assert [(w["connection"], w["sqlstate"]) for w in _lost(logs)] == [("consumer:echo", "57P01")], logs[-3000:]
        assert "Restarting consumer" not in logs
    finally:
        assert group.terminate() == 0
        client.broker.close()


def test_the_redis_ack_writer_reconnects_and_commits_the_acks_it_holds(services, tmp_path):
    """The Redis ack writer whose Postgres backend is terminated while it writes a batch's events holds the
    batch's acks, writes the events on a new connection at once and then sends the acks: every job succeeds
    once, no message waits for redelivery, and the reconnect is a counted warning."""
    dsn = services["dsn"]
    client = make_client("redis")
    group = WorkerGroup(worker_env(services, "redis"), threads=2, metrics=True, log_dir=tmp_path).start()
    try:
        trace = str(uuid.uuid4())
        _kill_insert_in_flight(dsn, meanwhile=lambda: _echo_jobs(client, trace, range(6)))
        _echo_jobs(client, trace, range(6, 12))
        started = [e for e in _wait_succeeded(dsn, trace, 12) if e["type"] == "job.started"]
        assert len(started) == 12 and len({e["job_id"] for e in started}) == 12  # each ran once: nothing redelivered
        logs = group.logs()
        assert [(w["connection"], w["sqlstate"]) for w in _lost(logs)] == [("ack-writer", "57P01")], logs[-3000:]
        assert '"acks.held"' not in logs and "fleet_insert_events" not in logs
        _wait_counted(group, "ack-writer")
    finally:
        assert group.terminate() == 0
        client.broker.close()


def test_a_redis_consumer_whose_server_restarts_reads_again_without_a_consumer_restart(services, tmp_path):
    """Redis restarts under an idle worker: its consumer reconnects by itself (at once, then with backoff up to
    0.5 s), not through dramatiq's fixed 3 s consumer restart, and a job sent after the restart is processed."""
    from fleet.shared.services import EmbeddedRedis

    dsn = services["dsn"]
    server = EmbeddedRedis(tmp_path / "own-redis")
    url = server.up()
    client = make_client("redis", REDIS_URL=url)
    group = WorkerGroup(worker_env(services, "redis", REDIS_URL=url), threads=2, metrics=True, log_dir=tmp_path).start()
    try:
        first = str(uuid.uuid4())
        client.enqueue("echo", {"message": "before"}, trace_id=first)
        wait_for(lambda: _succeeded(dsn, first), 60, what="a job before the restart")
        server.down()
        wait_for(
            lambda: '"connection": "consumer:echo"' in group.logs(), 60, what="the consumer to lose its connection"
        )
        server.up()
        after = str(uuid.uuid4())
        client.enqueue("echo", {"message": "after"}, trace_id=after)
        wait_for(lambda: _succeeded(dsn, after), 60, what="a job after the restart")
        logs = group.logs()
        assert any(w["connection"] == "consumer:echo" and w["level"] == "warning" for w in _lost(logs)), logs[-3000:]
        assert "Consumer encountered a connection error" not in logs and "Restarting consumer" not in logs
        _wait_counted(group, "consumer:echo")
    finally:
        assert group.terminate() == 0
        client.broker.close()
        server.down()


def test_short_backend_kill_soak_loses_nothing(tmp_path):
    """`make soak-reconnect`'s backend-kill scenario, short: one of the worker's backends terminated twice a
    second under a steady load. Asserts only what does not depend on the machine's speed: every job sent
    started, no consumer was restarted by dramatiq, and the losses were seen and recovered from."""
    out = tmp_path / "reconnect.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.soak_reconnect",
            "--rate",
            "50",
            "--clean-s",
            "2",
            "--kill-s",
            "8",
            "--after-s",
            "2",
            "--no-restart",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    report = json.loads(out.read_text())
    assert report["lost_count"] == 0 and report["jobs_started"] == report["jobs_sent"] > 0
    assert sum(report["kill"]["backends_killed"].values()) >= 8
    assert report["worker_log"]["connection_lost"] >= 1 and report["worker_log"]["consumer_restarts"] == 0


def test_the_pools_own_warning_per_discarded_connection_gives_way_to_the_reconnect_rule():
    """One warning per episode: psycopg_pool's warning for each closed connection it discards is dropped (the
    reconnect rule has logged the episode), its other warnings are kept."""
    import logging

    from fleet.shared.logs import configure_logging

    configure_logging("INFO")
    pool_logger = logging.getLogger("psycopg.pool")

    def passes(message: str, *args) -> bool:
        record = pool_logger.makeRecord("psycopg.pool", logging.WARNING, __file__, 1, message, args, None)
        return all(f(record) if callable(f) else f.filter(record) for f in pool_logger.filters)

    assert not passes("discarding closed connection: %s", "<psycopg.Connection [BAD]>")
    assert not passes("discarding broken connection: %s", "<psycopg.Connection [BAD]>")
    assert passes("error connecting in %r: %s", "fleet", "connection refused")
