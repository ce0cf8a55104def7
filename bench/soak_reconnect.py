"""Reconnect soak: pickup latency while the database kills the fleet's connections, and through a PostgreSQL
restart. A producer sends a fixed rate of jobs (100/s by default) with `pgmq.send` from SQL, each stamped with
its send time, to one worker process (8 threads, pgmq broker); each job records when it started. Phases:

1. clean (10 s);
2. backend kill (30 s): `pg_terminate_backend` of one of the fleet's backends (any connection the worker
   process holds: its consumers, LISTEN, heartbeat, pool) twice a second; then 10 s after;
3. restart: PostgreSQL stopped in immediate mode (a crash), started again after 3 s; then 10 s after.

    python -m bench.soak_reconnect [--rate 100] [--threads 8] [--kill-s 30] [--no-restart] [--json FILE]

Reports pickup (send to start) p50/p99/max per phase, by send time, and the time from the database
accepting connections again to the end of the first 100 ms in which jobs start at 90% of the rate or more. Checks
that every job sent started, and counts those that started twice. It starts its own PostgreSQL under a
temporary FLEET_HOME and stops it and the workers, by PID, when it ends; exits 1 when a job was lost or a
target was missed (with --targets).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psycopg

from bench.isolation import isolated_home
from bench.reconnect_jobs import QUEUE

FLEET_APPS = ("fleet", "fleet-notifier")  # the application_name of every connection a worker process opens
KILL_P99_TARGET_MS = 250
RESTART_TARGET_S = 1.0


class Producer(threading.Thread):
    """Sends job `seq` at t0 + seq / rate on its own connection (not one of the fleet's: it is never killed,
    only refused while the database is down); a job whose slot passed while the database was down is sent
    as soon as it accepts connections, stamped with its actual send time."""

    def __init__(self, dsn: str, rate: float) -> None:
        super().__init__(daemon=True, name="producer")
        self.dsn, self.rate = dsn, rate
        self.sent = 0
        self.stopping = threading.Event()
        self.errors = Counter()

    def run(self) -> None:
        conn = None
        t0 = time.monotonic()
        while not self.stopping.is_set():
            wait = t0 + self.sent / self.rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                if conn is None:
                    conn = psycopg.connect(
                        self.dsn, autocommit=True, application_name="soak-producer", connect_timeout=2
                    )
                body = json.dumps({"seq": self.sent, "t": time.time()})
                conn.execute("select pgmq.send(%s, %s::jsonb)", (QUEUE, body))
                self.sent += 1
            except psycopg.Error as e:
                self.errors[type(e).__name__] += 1
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.01)
        if conn is not None:
            conn.close()


class Killer(threading.Thread):
    """Terminates one of the fleet's backends, chosen at random, `per_s` times a second while `active`."""

    def __init__(self, dsn: str, per_s: float) -> None:
        super().__init__(daemon=True, name="killer")
        self.dsn, self.interval = dsn, 1 / per_s
        self.active = threading.Event()
        self.stopping = threading.Event()
        self.killed = Counter()  # by what the backend was doing

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True, application_name="soak-killer") as admin:
            while not self.stopping.is_set():
                if not self.active.wait(0.1):
                    continue
                row = admin.execute(
                    "select pg_terminate_backend(pid), application_name, query from pg_stat_activity"
                    " where application_name = any(%s) and backend_type = 'client backend'"
                    " and pid <> pg_backend_pid() order by random() limit 1",
                    (list(FLEET_APPS),),
                ).fetchone()
                if row:
                    self.killed[what_backend(row[1], row[2] or "")] += 1
                self.stopping.wait(self.interval)


def started(dsn: str) -> list[tuple]:
    """(seq, sent at, started at) of each start recorded."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            "select (payload->>'seq')::int, (payload->>'t')::float8, (payload->>'started')::float8"
            " from bus_events where type = 'probe.started'"
        ).fetchall()


def what_backend(app: str, query: str) -> str:
    if app == "fleet-notifier":
        return "notifier"
    if "fleet_ack_and_read" in query or "min(vt)" in query:
        return "consumer"
    if "set_vt" in query:
        return "heartbeat"
    return "other"


def percentiles(ms: list[float]) -> dict:
    if not ms:
        return {"jobs": 0}
    ms = sorted(ms)
    return {
        "jobs": len(ms),
        "p50_ms": round(statistics.median(ms), 1),
        "p99_ms": round(ms[max(0, int(len(ms) * 0.99) - 1)], 1),
        "max_ms": round(ms[-1], 1),
    }


def back_to_full(starts: list[float], since: float, rate: float, until: float, window_s: float = 0.1) -> float | None:
    """Seconds from `since` to the end of the first 100 ms window (in 10 ms steps) in which jobs started at
    90% of `rate` or more."""
    starts = sorted(s for s in starts if s >= since)
    t, j = since, 0
    while t + window_s <= until:
        while j < len(starts) and starts[j] < t:
            j += 1
        k = j
        while k < len(starts) and starts[k] < t + window_s:
            k += 1
        if k - j >= 0.9 * rate * window_s:
            return round(t + window_s - since, 2)
        t += 0.01
    return None


def run(
    rate: float,
    threads: int,
    clean_s: float,
    kill_s: float,
    after_s: float,
    kills_per_s: float,
    restart: bool,
    down_s: float,
) -> dict:
    with isolated_home("pgmq", "soak-reconnect") as home:
        return _run(
            home,
            rate=rate,
            threads=threads,
            clean_s=clean_s,
            kill_s=kill_s,
            after_s=after_s,
            kills_per_s=kills_per_s,
            restart=restart,
            down_s=down_s,
        )


def _run(
    home: Path,
    rate: float,
    threads: int,
    clean_s: float,
    kill_s: float,
    after_s: float,
    kills_per_s: float,
    restart: bool,
    down_s: float,
) -> dict:
    from fleet.ops.processes import WorkerGroup, wait_for
    from fleet.shared.config import reset_settings
    from fleet.shared.migrate import migrate
    from fleet.shared.services import EmbeddedPostgres

    pg = EmbeddedPostgres(home)
    group = producer = killer = None
    try:
        dsn = pg.up()
        os.environ.update({"DATABASE_URL": dsn, "FLEET_DB_POOLER": "false"})
        reset_settings()
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn)
        logs = home / "logs"
        logs.mkdir()
        env = dict(os.environ) | {"FLEET_JOBS": "bench.reconnect_jobs", "FLEET_LOG_LEVEL": "INFO"}
        group = WorkerGroup(env, processes=1, threads=threads, metrics=False, log_dir=logs, queues=[QUEUE]).start()
        with psycopg.connect(dsn, autocommit=True) as conn:  # the consumer created the queue
            wait_for(
                lambda: conn.execute("select 1 from pgmq.list_queues() where queue_name = %s", (QUEUE,)).fetchone(),
                60,
                what="the probe queue",
            )
        producer, killer = Producer(dsn, rate), Killer(dsn, kills_per_s)
        killer.start()
        marks = timeline(pg, producer, killer, clean_s, kill_s, after_s, restart, down_s)
        producer.stopping.set()
        producer.join()
        sent = producer.sent

        def all_started() -> list[tuple] | None:
            rows = started(dsn)
            return rows if len({r[0] for r in rows}) >= sent else None

        try:
            rows = wait_for(all_started, 120, 0.5, "every job sent to start")
        except AssertionError:  # reported as lost
            rows = started(dsn)
        return report(rows, sent, marks, rate, producer, killer, group.logs(), restart)
    finally:
        for thread in (producer, killer):
            if thread is not None:
                thread.stopping.set()
                thread.join(10)
        if group is not None:
            group.terminate(30)
        pg.down()


def timeline(
    pg, producer: Producer, killer: Killer, clean_s: float, kill_s: float, after_s: float, restart: bool, down_s: float
) -> dict[str, float]:
    """The scenario under load: clean, backends killed, after; then a restart and after. Returns its marks."""
    marks = {"start": time.time()}
    producer.start()
    time.sleep(clean_s)
    marks["kill_start"] = time.time()
    killer.active.set()
    time.sleep(kill_s)
    killer.active.clear()
    marks["kill_end"] = time.time()
    time.sleep(after_s)
    if restart:
        marks["pg_down"] = time.time()
        pg.down(mode="immediate")
        time.sleep(down_s)
        pg.up()
        marks["pg_accepting"] = time.time()  # pg_ctl start -w returns once it accepts connections
        time.sleep(after_s)
    marks["end"] = time.time()
    return marks


def report(
    rows: list[tuple], sent: int, marks: dict, rate: float, producer: Producer, killer: Killer, logs: str, restart: bool
) -> dict:
    runs = Counter(r[0] for r in rows)
    first = {}
    for seq, t, started in sorted(rows, key=lambda r: r[2]):
        first.setdefault(seq, (t, started))

    def window(lo: float, hi: float) -> dict:
        return percentiles([(s - t) * 1000 for t, s in first.values() if lo <= t < hi])

    r: dict = {
        "rate_per_s": rate,
        "jobs_sent": sent,
        "jobs_started": len(first),
        "lost": sorted(set(range(sent)) - set(first))[:20],
        "lost_count": len(set(range(sent)) - set(first)),
        "started_twice": sum(1 for n in runs.values() if n > 1),
        "clean": window(marks["start"], marks["kill_start"]),
        "kill": {
            "backends_killed": dict(killer.killed),
            "during": window(marks["kill_start"], marks["kill_end"]),
            "after_10s": window(marks["kill_end"], min(marks["kill_end"] + 10, marks.get("pg_down", marks["end"]))),
        },
        "producer_errors": dict(producer.errors),
        "worker_log": {
            "connection_lost": logs.count('"db.connection_lost"'),
            "reconnected": logs.count('"db.reconnected"'),
            "consumer_restarts": logs.count("Restarting consumer"),
            "critical": logs.count('"critical"'),
        },
    }
    if restart:
        accepting = marks["pg_accepting"]
        r["restart"] = {
            "down_s": round(accepting - marks["pg_down"], 2),
            "after_10s": window(accepting, accepting + 10),
            "first_start_after_accepting_s": round(
                min((s for _, s in first.values() if s >= accepting), default=float("nan")) - accepting, 3
            ),
            "back_to_full_throughput_s": back_to_full([s for _, s in first.values()], accepting, rate, marks["end"]),
        }
    r["problems"] = problems(r)
    return r


def problems(r: dict) -> list[str]:
    found = []
    if r["lost_count"]:
        found.append(f"{r['lost_count']} job(s) sent never started: {r['lost']}")
    if r["worker_log"]["consumer_restarts"]:
        found.append(f"{r['worker_log']['consumer_restarts']} consumer restart(s) by dramatiq")
    return found


def target_misses(r: dict) -> list[str]:
    misses = []
    p99 = r["kill"]["during"].get("p99_ms", 0)
    if p99 >= KILL_P99_TARGET_MS:
        misses.append(f"pickup p99 {p99} ms with backends killed (target < {KILL_P99_TARGET_MS} ms)")
    full = r.get("restart", {}).get("back_to_full_throughput_s", 0)
    if "restart" in r and (full is None or full > RESTART_TARGET_S):
        misses.append(f"full throughput {full} s after the restart (target within {RESTART_TARGET_S} s)")
    return misses


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak_reconnect", description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=100, help="jobs per second")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--clean-s", type=float, default=10)
    p.add_argument("--kill-s", type=float, default=30)
    p.add_argument("--after-s", type=float, default=10)
    p.add_argument("--kills-per-s", type=float, default=2)
    p.add_argument("--down-s", type=float, default=3, help="seconds PostgreSQL stays down in the restart")
    p.add_argument("--no-restart", action="store_true")
    p.add_argument("--targets", action="store_true", help="also exit 1 when a latency target is missed")
    p.add_argument("--json", type=Path, help="also write the report to this file")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the workers and PostgreSQL stop by PID
    r = run(
        args.rate,
        args.threads,
        args.clean_s,
        args.kill_s,
        args.after_s,
        args.kills_per_s,
        not args.no_restart,
        args.down_s,
    )
    r["target_misses"] = target_misses(r)
    print(json.dumps(r, indent=2), flush=True)
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
    failed = r["problems"] + (r["target_misses"] if args.targets else [])
    for line in failed:
        print(f"reconnect soak FAILED: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
