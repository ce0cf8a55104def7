"""A consumer whose connection the database ends (a pooler recycling it, a failover, pg_terminate_backend)
reconnects by itself at once: dramatiq's fixed 3 s consumer restart is not involved, the fault is a warning
with its SQLSTATE, and the reconnect is counted."""

from __future__ import annotations

import uuid

import httpx
import psycopg

from .conftest import make_client, worker_env
from .helpers import WorkerGroup, events, wait_for


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
