"""`make bench`: every benchmark in one run, each measured against a baseline taken in the same run.

Prints `name: value` lines and the ratios, and writes bench/RESULTS.md.
Each measurement runs in its own process so no broker state leaks between them.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"

# (label, args, env overrides)
MEASUREMENTS = [
    ("StubBroker ceiling (dramatiq in memory)", ["drain", "--broker", "stub", "--jobs", "30000"], {}),
    ("stock RedisBroker", ["drain", "--broker", "redis", "--jobs", "20000"], {}),
    ("PgmqBroker", ["drain", "--broker", "pgmq", "--jobs", "30000"], {}),
    ("PgmqBroker, prefetch 64", ["drain", "--broker", "pgmq", "--jobs", "30000"], {"dramatiq_queue_prefetch": "64"}),
    ("PgmqBroker + full fleet middleware", ["drain", "--broker", "pgmq-fleet", "--jobs", "20000"], {}),
    ("raw pgmq read+delete", ["raw-pgmq", "--jobs", "50000"], {}),
    ("bulk enqueue", ["enqueue", "--jobs", "50000"], {}),
    ("idle pickup", ["pickup", "--samples", "300"], {}),
    ("pgvector upsert", ["upsert"], {"module": "bench.embed"}),
    ("embedding end to end", ["docs"], {"module": "bench.embed"}),
    ("chat added latency", ["latency"], {"module": "bench.chat"}),
    ("chat throughput", ["throughput"], {"module": "bench.chat"}),
    ("gateway added latency (pgmq)", ["latency", "--broker", "pgmq"], {"module": "bench.gateway"}),
    ("gateway added latency (redis)", ["latency", "--broker", "redis"], {"module": "bench.gateway"}),
    ("1,000 idle SSE streams on one gateway (pgmq)", ["streams", "--broker", "pgmq"], {"module": "bench.gateway"}),
    ("1,000 idle SSE streams on one gateway (redis)", ["streams", "--broker", "redis"], {"module": "bench.gateway"}),
    ("memory lifecycle on 1,000,000 memories", [], {"module": "bench.lifecycle"}),
    ("upgrade fan-out to 100,000 agents", [], {"module": "bench.upgrade"}),
    ("drain with 1, 2 and 4 worker processes", ["processes"], {"module": "bench.growth"}),
    ("10k vs 1M messages waiting", ["depth"], {"module": "bench.growth"}),
]


def settle() -> None:
    """Let the previous measurement's writes land (checkpoint, autovacuum) before the next one starts:
    on two cores, a write-heavy benchmark otherwise slows the latency one after it."""
    from fleet.shared.db import connect

    with connect() as conn:
        conn.execute("vacuum analyze")
        conn.execute("checkpoint")
    time.sleep(3)


def measure(args: list[str], env_extra: dict) -> dict[str, float]:
    env_extra = dict(env_extra)
    module = env_extra.pop("module", "bench.drain")
    env = dict(os.environ) | env_extra
    out = subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"benchmark {args} failed:\n{out.stderr[-3000:]}")
    figures = {}
    for line in out.stdout.splitlines():
        name, _, value = line.partition(": ")
        if value:
            figures[name] = float(value)
    return figures


def main() -> int:
    from fleet.shared.config import get_settings
    from fleet.shared.db import connect, database_dsn, redis_url
    from fleet.shared.migrate import migrate
    from fleet.shared.services import EmbeddedPostgres, EmbeddedRedis

    settings = get_settings()
    started = []
    if settings.database_url is None and not EmbeddedPostgres(settings.home).running():
        started.append(EmbeddedPostgres(settings.home))
    if settings.redis_url is None and not EmbeddedRedis(settings.home).running():
        started.append(EmbeddedRedis(settings.home))
    os.environ["DATABASE_URL"] = database_dsn(settings)
    os.environ["REDIS_URL"] = redis_url(settings)
    os.environ.setdefault("FLEET_DB_POOLER", "false")
    try:
        with connect() as conn:
            migrate(conn)
        figures: dict[str, float] = {}
        for label, args, env in MEASUREMENTS:
            settle()
            t = time.monotonic()
            got = measure(args, env)
            if "dramatiq_queue_prefetch" in env:
                got = {f"{k}_prefetch64": v for k, v in got.items()}
            figures |= got
            print(f"# {label} ({time.monotonic() - t:.1f}s)", flush=True)
            for k, v in got.items():
                print(f"{k}: {v:g}", flush=True)
    finally:
        for service in started:
            service.down()

    ratios = [
        ("PgmqBroker drain / stock RedisBroker drain", figures["drain_pgmq_jobs_per_s"] / figures["drain_redis_jobs_per_s"], ">= 2"),
        ("PgmqBroker drain / StubBroker ceiling", figures["drain_pgmq_jobs_per_s"] / figures["drain_stub_jobs_per_s"], ">= 0.5"),
        ("PgmqBroker (prefetch 64) drain / StubBroker ceiling",
         figures["drain_pgmq_jobs_per_s_prefetch64"] / figures["drain_stub_jobs_per_s"], ">= 0.5"),
        ("PgmqBroker drain / raw pgmq read+delete", figures["drain_pgmq_jobs_per_s"] / figures["raw_pgmq_read_delete_per_s"], "-"),
        ("full fleet stack drain / StubBroker ceiling", figures["drain_pgmq_fleet_jobs_per_s"] / figures["drain_stub_jobs_per_s"], "-"),
        ("SDK bulk enqueue / raw send_batch", figures["enqueue_sdk_jobs_per_s"] / figures["enqueue_raw_send_batch_per_s"], ">= 0.8"),
        ("embedding docs/s / provider-bound limit", figures["embed_docs_per_s"] / figures["embed_provider_bound_docs_per_s"], ">= 0.9"),
        ("chats/s / provider-bound limit", figures["chat_per_s"] / figures["chat_provider_bound_per_s"], "-"),
        ("pgvector upsert, binary COPY / executemany (HNSW index)",
         figures["upsert_copy_hnsw_rows_per_s"] / figures["upsert_executemany_hnsw_rows_per_s"], ">= 10"),
        ("pgvector upsert, binary COPY / executemany (no index)",
         figures["upsert_copy_noindex_rows_per_s"] / figures["upsert_executemany_noindex_rows_per_s"], ">= 10"),
        ("drain, 2 worker processes / 1", figures["growth_drain_2proc_jobs_per_s"] / figures["growth_drain_1proc_jobs_per_s"], "-"),
        ("drain, 4 worker processes / 1", figures["growth_drain_4proc_jobs_per_s"] / figures["growth_drain_1proc_jobs_per_s"], "-"),
        ("read+delete with 1M waiting / with 10k waiting",
         figures["growth_read_delete_1m_waiting_per_s"] / figures["growth_read_delete_10k_waiting_per_s"], "-"),
        ("read+delete after draining 1M (dead rows) / with 10k waiting",
         figures["growth_read_delete_after_purge_per_s"] / figures["growth_read_delete_10k_waiting_per_s"], "-"),
    ]
    print()
    for name, value, target in ratios:
        print(f"ratio {name}: {value:.2f} (target {target})")
    print(f"idle pickup p50: {figures['pickup_p50_ms']:.2f} ms (target < 15 ms), p99: {figures['pickup_p99_ms']:.2f} ms")
    print(f"chat added latency p50: {figures['chat_added_latency_p50_ms']:.1f} ms (target < 30 ms), "
          f"p99: {figures['chat_added_latency_p99_ms']:.1f} ms")
    for broker in ("pgmq", "redis"):
        print(f"gateway added latency to the first delta ({broker}): p50 {figures[f'gateway_{broker}_added_latency_p50_ms']:.1f} ms,"
              f" p99 {figures[f'gateway_{broker}_added_latency_p99_ms']:.1f} ms; idle SSE streams held by one process:"
              f" {figures[f'gateway_{broker}_idle_streams']:,.0f} (target 1,000)")
    print(f"upgrade fan-out: {figures['upgrade_fanout_agents']:,.0f} agents in {figures['upgrade_fanout_s']:.2f} s")
    print(f"lifecycle: {figures['lifecycle_examined_per_s']:,.0f} memory-actions examined/s, "
          f"{figures['lifecycle_applied_per_s']:,.0f} applied/s on {figures['lifecycle_rows']:,.0f} memories")
    write_results(figures, ratios)
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")
    return 0


def write_results(figures: dict[str, float], ratios: list) -> None:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        "# Benchmark results",
        "",
        f"Measured by `make bench` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC: {os.cpu_count()} cores ({cpu}),",
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}; embedded PostgreSQL 18 and Redis on loopback.",
        "One worker process with 8 threads, no-op jobs, unless a figure says otherwise. Every figure comes from the same run as its baseline.",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    lines += [f"| `{k}` | {v:,.2f} |" for k, v in figures.items()]
    lines += ["", "| ratio | value | target |", "|---|---|---|"]
    lines += [f"| {name} | {value:.2f} | {target} |" for name, value, target in ratios]
    lines += ["", f"Idle pickup (enqueue to actor start): p50 {figures['pickup_p50_ms']:.2f} ms, p99 {figures['pickup_p99_ms']:.2f} ms (target p50 < 15 ms).",
              f"Chat latency the fleet adds (first delta at a listener minus the provider's time to first token): "
              f"p50 {figures['chat_added_latency_p50_ms']:.1f} ms, p99 {figures['chat_added_latency_p99_ms']:.1f} ms (target p50 < 30 ms).",
              f"Memory lifecycle (expire, archive, decay) on {figures['lifecycle_rows']:,.0f} memories: "
              f"{figures['lifecycle_examined_per_s']:,.0f} memory-actions examined/s, {figures['lifecycle_applied_per_s']:,.0f} applied/s "
              f"({figures['lifecycle_applied']:,.0f} changes in {figures['lifecycle_run_s']:.1f} s; the exact dry run took {figures['lifecycle_dry_run_s']:.1f} s).",
              f"Upgrade fan-out: {figures['upgrade_fanout_agents']:,.0f} agents (rows and jobs) in {figures['upgrade_fanout_s']:.2f} s.",
              f"Queue table bloat: {figures['growth_table_mb_full']:.0f} MB holding 1M messages, "
              f"{figures['growth_table_mb_drained']:.0f} MB once drained (dead rows until VACUUM), "
              f"{figures['growth_table_mb_after_vacuum_full']:.1f} MB after VACUUM FULL.", ""]
    RESULTS.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
