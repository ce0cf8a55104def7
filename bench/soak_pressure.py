"""Pressure soak: a transaction held open for 10 minutes, pinning the xmin horizon so that vacuum cannot remove
dead rows, while the fleet drains a steady load. A producer sends a fixed rate of jobs (100/s by default) with
`pgmq.send` from SQL, each stamped with its send time, to one worker process (8 threads, pgmq broker); each job
records when it started (the reconnect soak's job type, bench.reconnect_jobs). Phases:

1. warm-up (180 s): the load alone, with autovacuum at PostgreSQL's defaults (a visit a minute);
2. hold (600 s): another connection runs `begin isolation level repeatable read; select txid_current()` and
   stays idle in that transaction; every row the fleet deletes or updates from then on stays in the tables;
3. recovery (300 s): the transaction commits, the load goes on, and autovacuum alone cleans up (nothing here
   runs VACUUM).

    python -m bench.soak_pressure [--rate 100] [--threads 8] [--warmup 180] [--hold 600] [--recovery 300]
                                  [--interval 10] [--naptime S] [--json FILE]

Every interval it records the jobs started per second, the pickup latency (send to start) p50/p99 of the jobs
started in the interval, the queue's depth, the age of the oldest transaction's xmin, and for every table the
fleet writes (the queue `pgmq.q_<queue>`, its archive `pgmq.a_<queue>`, `bus_events`): size (heap and total
with indexes), live and dead rows, and autovacuum runs. It prints that timeline and a summary (throughput,
pickup and table sizes before, during and after the hold). It exits 1 when a job sent never started, or when
throughput collapses: the jobs started during the hold below 90% of those sent in it, or any interval of the
hold below half the rate. It starts its own PostgreSQL under a temporary FLEET_HOME and stops it and the
workers, by PID, when it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import psycopg

from bench.isolation import isolated_home
from bench.reconnect_jobs import QUEUE
from bench.soak_reconnect import Producer, percentiles, started

THROUGHPUT_FLOOR = 0.9  # jobs started in the hold / jobs sent in it
INTERVAL_FLOOR = 0.5  # any interval of the hold: jobs started per second / rate
TABLES = (f"pgmq.q_{QUEUE}", f"pgmq.a_{QUEUE}", "public.bus_events")

SETTINGS = (
    "select name, setting || coalesce(unit, '') from pg_settings"
    " where name like 'autovacuum%' or name in ('server_version', 'track_counts', 'vacuum_cost_delay')"
)
SAMPLE_TABLES = """
select schemaname || '.' || relname, pg_relation_size(relid), pg_total_relation_size(relid),
       n_live_tup, n_dead_tup, autovacuum_count, vacuum_count, n_tup_ins + n_tup_upd + n_tup_del
  from pg_stat_user_tables
"""
SAMPLE_HORIZON = """
select coalesce(max(age(backend_xmin)), 0), coalesce(max(age(backend_xid)), 0) from pg_stat_activity
 where pid <> pg_backend_pid()
"""


class Sampler(threading.Thread):
    """Every `interval` seconds, on its own connection: every user table's size, live and dead rows and
    vacuum counts, the queue's depth, and the age of the oldest xmin any backend holds."""

    def __init__(self, dsn: str, interval: float) -> None:
        super().__init__(daemon=True, name="sampler")
        self.dsn, self.interval = dsn, interval
        self.samples: list[dict] = []
        self.stopping = threading.Event()
        self.errors = 0

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True, application_name="soak-sampler") as conn:
            due = time.monotonic()
            while not self.stopping.is_set():
                try:
                    self.samples.append(self.sample(conn))
                except psycopg.Error:
                    self.errors += 1
                due += self.interval
                self.stopping.wait(max(0.0, due - time.monotonic()))

    @staticmethod
    def sample(conn: psycopg.Connection) -> dict:
        t = time.time()
        tables = {
            name: {
                "heap_bytes": heap,
                "total_bytes": total,
                "live": live,
                "dead": dead,
                "autovacuums": autovacuums,
                "vacuums": vacuums,
                "writes": writes,
            }
            for name, heap, total, live, dead, autovacuums, vacuums, writes in conn.execute(SAMPLE_TABLES)
        }
        xmin_age, xid_age = conn.execute(SAMPLE_HORIZON).fetchone()
        depth = conn.execute(f"select count(*) from pgmq.q_{QUEUE}").fetchone()[0]
        return {"t": t, "depth": depth, "xmin_age": xmin_age, "xid_age": xid_age, "tables": tables}


def run(
    rate: float,
    threads: int,
    warmup_s: float,
    hold_s: float,
    recovery_s: float,
    interval: float,
    naptime_s: float | None = None,
) -> dict:
    with isolated_home("pgmq", "soak-pressure") as home:
        return _run(
            home,
            rate=rate,
            threads=threads,
            warmup_s=warmup_s,
            hold_s=hold_s,
            recovery_s=recovery_s,
            interval=interval,
            naptime_s=naptime_s,
        )


def _run(
    home: Path,
    rate: float,
    threads: int,
    warmup_s: float,
    hold_s: float,
    recovery_s: float,
    interval: float,
    naptime_s: float | None = None,
) -> dict:
    from fleet.ops.processes import WorkerGroup, wait_for
    from fleet.shared.config import reset_settings
    from fleet.shared.migrate import migrate
    from fleet.shared.services import EmbeddedPostgres

    pg = EmbeddedPostgres(home)
    group = producer = sampler = None
    try:
        dsn = pg.up()
        os.environ.update({"DATABASE_URL": dsn, "FLEET_DB_POOLER": "false"})
        reset_settings()
        with psycopg.connect(dsn, autocommit=True) as conn:
            migrate(conn)
            if naptime_s is not None:  # a cluster-wide setting: how often autovacuum visits each database
                conn.execute(f"alter system set autovacuum_naptime = '{naptime_s:g}s'")
                conn.execute("select pg_reload_conf()")
                time.sleep(0.5)
            settings = dict(conn.execute(SETTINGS).fetchall())
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
        producer, sampler = Producer(dsn, rate), Sampler(dsn, interval)
        sampler.start()
        marks = timeline(dsn, producer, warmup_s, hold_s, recovery_s)
        marks["producer_alive"] = producer.is_alive()
        producer.stopping.set()
        producer.join()
        sampler.stopping.set()
        sampler.join(30)
        sent = producer.sent

        def all_started() -> list[tuple] | None:
            rows = started(dsn)
            return rows if len({r[0] for r in rows}) >= sent else None

        try:
            rows = wait_for(all_started, 120, 0.5, "every job sent to start")
        except AssertionError:  # reported as lost
            rows = started(dsn)
        return report(rows, sent, marks, rate, interval, sampler.samples, producer, group.logs()) | {
            "settings": settings
        }
    finally:
        for thread in (producer, sampler):
            if thread is not None:
                thread.stopping.set()
                thread.join(10)
        if group is not None:
            group.terminate(30)
        pg.down()


def timeline(dsn: str, producer: Producer, warmup_s: float, hold_s: float, recovery_s: float) -> dict[str, float]:
    """The scenario under load: warm-up, a transaction held open, recovery. Returns its marks."""
    marks = {"start": time.time()}
    producer.start()
    time.sleep(warmup_s)
    with psycopg.connect(dsn, autocommit=True, application_name="soak-holder") as holder:
        holder.execute("begin isolation level repeatable read")
        xid = holder.execute("select txid_current()").fetchone()[0]
        marks["hold_start"] = time.time()
        print(f"pressure soak: transaction {xid} open for {hold_s:g} s", file=sys.stderr, flush=True)
        time.sleep(hold_s)
        holder.execute("commit")
        marks["hold_end"] = time.time()
    print("pressure soak: committed; recovery", file=sys.stderr, flush=True)
    time.sleep(recovery_s)
    marks["end"] = time.time()
    return marks


def phase_of(t: float, marks: dict) -> str:
    if t < marks["hold_start"]:
        return "warm-up"
    return "hold" if t < marks["hold_end"] else "recovery"


def intervals(first: dict, marks: dict, rate: float, interval: float, samples: list[dict]) -> list[dict]:
    """One row per interval, by start time: jobs started per second, pickup of those jobs, and the sample
    taken at the end of the interval."""
    t0 = marks["start"]
    n = int((marks["end"] - t0) // interval)
    buckets: list[list[float]] = [[] for _ in range(n)]
    for t, s in first.values():
        i = int((s - t0) // interval)
        if 0 <= i < n:
            buckets[i].append((s - t) * 1000)
    rows = []
    for i, ms in enumerate(buckets):
        lo, hi = t0 + i * interval, t0 + (i + 1) * interval
        sample = min(samples, key=lambda x: abs(x["t"] - hi)) if samples else None
        p = percentiles(ms)
        rows.append(
            {
                "t_s": round(hi - t0),
                "phase": phase_of(lo, marks),
                "jobs_per_s": round(len(ms) / interval, 1),
                "p50_ms": p.get("p50_ms"),
                "p99_ms": p.get("p99_ms"),
                "sample": sample,
            }
        )
    return rows


def phase_summary(first: dict, rows: list[dict], lo: float, hi: float, phase: str) -> dict:
    """Throughput and pickup of one phase: jobs sent and started in it, by their start time."""
    ms = [(s - t) * 1000 for t, s in first.values() if lo <= s < hi]
    sent = sum(1 for t, _ in first.values() if lo <= t < hi)
    rates = [r["jobs_per_s"] for r in rows if r["phase"] == phase]
    return {
        "seconds": round(hi - lo, 1),
        "jobs_sent": sent,
        "jobs_started": len(ms),
        "jobs_per_s": round(len(ms) / (hi - lo), 1) if hi > lo else None,
        "min_interval_jobs_per_s": min(rates, default=None),
        "pickup": percentiles(ms),
    }


def table_at(sample: dict | None, name: str) -> dict | None:
    if sample is None or name not in sample["tables"]:
        return None
    t = sample["tables"][name]
    return {
        "total_mb": round(t["total_bytes"] / 2**20, 2),
        "heap_mb": round(t["heap_bytes"] / 2**20, 2),
        "live": t["live"],
        "dead": t["dead"],
        "autovacuums": t["autovacuums"],
    }


def nearest(samples: list[dict], t: float) -> dict | None:
    return min(samples, key=lambda x: abs(x["t"] - t)) if samples else None


def written_tables(samples: list[dict]) -> list[str]:
    """The tables listed in TABLES, and any other the run wrote to at least once per 100 jobs' worth."""
    if len(samples) < 2:
        return list(TABLES)
    a, b = samples[0]["tables"], samples[-1]["tables"]
    jobs = max(1, b.get(f"pgmq.q_{QUEUE}", {}).get("writes", 0) // 3)
    others = sorted(n for n in b if n not in TABLES and b[n]["writes"] - a.get(n, {}).get("writes", 0) >= jobs / 100)
    return [n for n in TABLES if n in b] + others


def tables_summary(samples: list[dict], marks: dict) -> dict:
    """Per table: at the start of the hold, its end, the end of the recovery, and the largest; when the
    first autovacuum after the commit ran, and how its size changed from then to the end. "Normal" is the warm-up's
    steady state: its dead rows at most the most the warm-up had (autovacuum visits once a minute), after the
    commit."""
    out = {}
    warm = [s for s in samples if s["t"] < marks["hold_start"]]
    after = [s for s in samples if s["t"] >= marks["hold_end"]]
    start, end_hold = nearest(samples, marks["hold_start"]), nearest(samples, marks["hold_end"])
    for name in written_tables(samples):

        def get(sample: dict, key: str, name: str = name) -> int:
            return sample["tables"].get(name, {}).get(key, 0)

        base_av = get(end_hold, "autovacuums") if end_hold else 0
        cleaned = next((s for s in after if get(s, "autovacuums") > base_av), None)
        normal_dead = max((get(s, "dead") for s in warm), default=0)
        normal = next((s for s in after if get(s, "autovacuums") > base_av and get(s, "dead") <= normal_dead), None)
        peak = max(samples, key=lambda s: get(s, "total_bytes"))
        out[name] = {
            "hold_start": table_at(start, name),
            "hold_end": table_at(end_hold, name),
            "peak": table_at(peak, name),
            "recovery_end": table_at(samples[-1], name),
            "first_autovacuum_after_commit_s": round(cleaned["t"] - marks["hold_end"], 1) if cleaned else None,
            "after_that_autovacuum": table_at(cleaned, name),
            "warmup_dead_max": normal_dead,
            "dead_back_to_warmup_s": round(normal["t"] - marks["hold_end"], 1) if normal else None,
            "change_after_that_autovacuum_mb": (
                round((get(samples[-1], "total_bytes") - get(cleaned, "total_bytes")) / 2**20, 2) if cleaned else None
            ),
        }
    return out


def report(
    rows: list[tuple],
    sent: int,
    marks: dict,
    rate: float,
    interval: float,
    samples: list[dict],
    producer: Producer,
    logs: str,
) -> dict:
    first: dict = {}
    runs: dict = {}
    for seq, t, s in sorted(rows, key=lambda r: r[2]):
        first.setdefault(seq, (t, s))
        runs[seq] = runs.get(seq, 0) + 1
    lost = sorted(set(range(sent)) - set(first))
    timeline_rows = intervals(first, marks, rate, interval, samples)
    phases = {
        "warm-up": (marks["start"], marks["hold_start"]),
        "hold": (marks["hold_start"], marks["hold_end"]),
        "recovery": (marks["hold_end"], marks["end"]),
    }
    end_hold = nearest(samples, marks["hold_end"])
    r: dict = {
        "rate_per_s": rate,
        "seconds": {k: round(hi - lo, 1) for k, (lo, hi) in phases.items()},
        "jobs_sent": sent,
        "jobs_started": len(first),
        "lost": lost[:20],
        "lost_count": len(lost),
        "started_twice": sum(1 for n in runs.values() if n > 1),
        "phases": {k: phase_summary(first, timeline_rows, lo, hi, k) for k, (lo, hi) in phases.items()},
        "xmin_age_at_hold_end": end_hold["xmin_age"] if end_hold else None,
        "tables": tables_summary(samples, marks) if samples else {},
        "producer_alive": marks["producer_alive"],
        "producer_errors": dict(producer.errors),
        "worker_log": {"consumer_restarts": logs.count("Restarting consumer"), "critical": logs.count('"critical"')},
        "timeline": [{k: v for k, v in row.items() if k != "sample"} | brief(row["sample"]) for row in timeline_rows],
    }
    r["problems"] = problems(r)
    return r


def brief(sample: dict | None) -> dict:
    """The columns of the timeline taken from a sample."""
    if sample is None:
        return {}
    q = sample["tables"].get(f"pgmq.q_{QUEUE}", {})
    ev = sample["tables"].get("public.bus_events", {})
    return {
        "depth": sample["depth"],
        "xmin_age": sample["xmin_age"],
        "queue_mb": round(q.get("total_bytes", 0) / 2**20, 2),
        "queue_heap_mb": round(q.get("heap_bytes", 0) / 2**20, 2),
        "queue_dead": q.get("dead"),
        "queue_autovacuums": q.get("autovacuums"),
        "bus_events_mb": round(ev.get("total_bytes", 0) / 2**20, 2),
    }


def problems(r: dict) -> list[str]:
    found = []
    if r["lost_count"]:
        found.append(f"{r['lost_count']} job(s) sent never started: {r['lost']}")
    if not r["producer_alive"]:
        found.append("the producer thread died before the end")
    hold = r["phases"]["hold"]
    if hold["jobs_sent"] and hold["jobs_started"] < THROUGHPUT_FLOOR * hold["jobs_sent"]:
        found.append(
            f"throughput collapsed in the hold: {hold['jobs_started']} jobs started of {hold['jobs_sent']} sent"
            f" (floor {THROUGHPUT_FLOOR:.0%})"
        )
    low = hold["min_interval_jobs_per_s"]
    if low is not None and low < INTERVAL_FLOOR * r["rate_per_s"]:
        found.append(f"an interval of the hold ran {low} jobs/s (floor {INTERVAL_FLOOR:.0%} of the rate)")
    return found


def print_timeline(r: dict) -> None:
    head = ("t s", "phase", "jobs/s", "p50 ms", "p99 ms", "depth", "xmin age", "queue MB", "dead rows", "autovac")
    print(("{:>6} {:<9} {:>7} {:>7} {:>8} {:>6} {:>9} {:>9} {:>10} {:>8}").format(*head))
    for row in r["timeline"]:
        print(
            ("{:>6} {:<9} {:>7} {:>7} {:>8} {:>6} {:>9} {:>9} {:>10} {:>8}").format(
                *(
                    "-" if row.get(k) is None else row[k]
                    for k in (
                        "t_s",
                        "phase",
                        "jobs_per_s",
                        "p50_ms",
                        "p99_ms",
                        "depth",
                        "xmin_age",
                        "queue_mb",
                        "queue_dead",
                        "queue_autovacuums",
                    )
                )
            )
        )


def print_summary(r: dict) -> None:
    print(f"\njobs sent {r['jobs_sent']}, started {r['jobs_started']}, lost {r['lost_count']},", end=" ")
    print(f"started twice {r['started_twice']}; xmin age at the end of the hold {r['xmin_age_at_hold_end']}")
    for name, p in r["phases"].items():
        pk = p["pickup"]
        print(
            f"{name:<9} {p['seconds']:>6} s  {p['jobs_per_s']} jobs/s (slowest interval {p['min_interval_jobs_per_s']})"
            f"  pickup p50 {pk.get('p50_ms')} ms, p99 {pk.get('p99_ms')} ms, max {pk.get('max_ms')} ms"
        )
    for name, t in r["tables"].items():
        print(
            f"{name}: first autovacuum {t['first_autovacuum_after_commit_s']} s after the commit; dead rows back"
            f" to the warm-up's at most {t['warmup_dead_max']} {t['dead_back_to_warmup_s']} s after it;"
            f" size changed by {t['change_after_that_autovacuum_mb']} MB from that autovacuum to the end"
        )
        for when in ("hold_start", "hold_end", "peak", "after_that_autovacuum", "recovery_end"):
            v = t[when]
            if v:
                print(
                    f"  {when:<22} {v['total_mb']:>8} MB (heap {v['heap_mb']} MB)"
                    f"  live {v['live']:>8}  dead {v['dead']:>8}  autovacuums {v['autovacuums']}"
                )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak_pressure", description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=100, help="jobs per second")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--warmup", type=float, default=180, help="seconds of load before the transaction opens")
    p.add_argument("--hold", type=float, default=600, help="seconds the transaction stays open")
    p.add_argument("--recovery", type=float, default=300, help="seconds of load after it commits")
    p.add_argument("--interval", type=float, default=10, help="seconds per row of the timeline")
    p.add_argument("--naptime", type=float, help="autovacuum_naptime in seconds (default: PostgreSQL's, 60)")
    p.add_argument("--json", type=Path, help="also write the report to this file")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the workers and PostgreSQL stop by PID
    r = run(args.rate, args.threads, args.warmup, args.hold, args.recovery, args.interval, args.naptime)
    print_timeline(r)
    print_summary(r)
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
    for line in r["problems"]:
        print(f"pressure soak FAILED: {line}", file=sys.stderr)
    return 1 if r["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
