"""`make bench`: every benchmark in one run, each measured against a baseline taken in the same run.

Prints `name: value` lines and the ratios, and writes bench/RESULTS.md.
Each measurement runs in its own process so no broker state leaks between them.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"

# Peers drained in interleaved rounds (each figure is the median of ROUNDS): 20,000 no-op jobs, one worker
# process x 8 threads (pgqueuer: its defaults, one asyncio process).
ROUNDS = 3
DRAIN_JOBS = "20000"
DRAIN_PEERS = [
    ("StubBroker (dramatiq in memory)", ["drain", "--broker", "stub", "--jobs", DRAIN_JOBS], {}),
    ("stock dramatiq + RedisBroker", ["drain", "--broker", "redis", "--jobs", DRAIN_JOBS], {}),
    ("fleet on Redis, full stack", ["drain", "--broker", "redis-fleet", "--jobs", DRAIN_JOBS], {}),
    ("PgmqBroker, dramatiq's default middleware", ["drain", "--broker", "pgmq", "--jobs", DRAIN_JOBS], {}),
    ("fleet on pgmq, full stack", ["drain", "--broker", "pgmq-fleet", "--jobs", DRAIN_JOBS], {}),
    ("pgqueuer, its defaults", ["drain", "--jobs", DRAIN_JOBS], {"module": "bench.peers"}),
]

# Measured once each, in this order. (label, args, env overrides)
MEASUREMENTS = [
    ("where a full-stack job's CPU goes (pgmq)", ["--broker", "pgmq", "--jobs", "5000"], {"module": "bench.profile"}),
    ("where a full-stack job's CPU goes (redis)", ["--broker", "redis", "--jobs", "5000"], {"module": "bench.profile"}),
    ("PgmqBroker, prefetch 64", ["drain", "--broker", "pgmq", "--jobs", DRAIN_JOBS], {"dramatiq_queue_prefetch": "64"}),
    (
        "fleet on pgmq, full stack, prefetch 64",
        ["drain", "--broker", "pgmq-fleet", "--jobs", DRAIN_JOBS],
        {"dramatiq_queue_prefetch": "64"},
    ),
    ("raw pgmq read(100)+delete loop", ["raw-pgmq", "--jobs", "50000"], {}),
    ("bulk enqueue", ["enqueue", "--jobs", "50000"], {}),
    ("8 producers, one job per transaction", ["--threads", "8"], {"module": "bench.producers"}),
    (
        "32 producers, one job per transaction",
        ["--threads", "32", "--jobs-per-thread", "200"],
        {"module": "bench.producers"},
    ),
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


def settle(pause_s: float = 3) -> None:
    """Let the previous measurement's writes land (checkpoint, autovacuum) before the next one starts:
    on two cores, a write-heavy benchmark otherwise slows the latency one after it."""
    from fleet.shared.db import connect

    with connect() as conn:
        conn.execute("vacuum analyze")
        conn.execute("checkpoint")
    time.sleep(pause_s)


def measure(args: list[str], env_extra: dict) -> dict[str, float]:
    env_extra = dict(env_extra)
    module = env_extra.pop("module", "bench.drain")
    env = dict(os.environ) | env_extra
    out = subprocess.run(
        [sys.executable, "-m", module, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    if out.returncode != 0:
        raise SystemExit(f"benchmark {args} failed:\n{out.stderr[-3000:]}")
    figures = {}
    for line in out.stdout.splitlines():
        name, _, value = line.partition(": ")
        if value:
            figures[name] = float(value)
    return figures


def report(label: str, started: float, got: dict[str, float]) -> None:
    print(f"# {label} ({time.monotonic() - started:.1f}s)", flush=True)
    for k, v in got.items():
        print(f"{k}: {v:g}", flush=True)


def interleaved_rounds() -> dict[str, float]:
    """Every peer once per round, ROUNDS rounds; the median of each figure."""
    seen: dict[str, list[float]] = {}
    for round_ in range(1, ROUNDS + 1):
        for label, args, env in DRAIN_PEERS:
            settle(1)
            t = time.monotonic()
            got = measure(args, env)
            report(f"round {round_}: {label}", t, got)
            for k, v in got.items():
                seen.setdefault(k, []).append(v)
    return {k: statistics.median(v) for k, v in seen.items()}


def main() -> int:
    from fleet.ops.terminal import print_table, progress_bar
    from fleet.shared.db import connect
    from fleet.shared.migrate import migrate
    from fleet.shared.services import use_embedded

    started = use_embedded(redis=True)  # where DATABASE_URL / REDIS_URL are not set
    try:
        with connect() as conn:
            migrate(conn)
        figures = interleaved_rounds()
        with progress_bar("benchmarks", len(MEASUREMENTS)) as bar:
            for done, (label, args, env) in enumerate(MEASUREMENTS, 1):
                settle()
                t = time.monotonic()
                got = measure(args, env)
                if "dramatiq_queue_prefetch" in env:
                    got = {f"{k}_prefetch64": v for k, v in got.items()}
                figures |= got
                report(label, t, got)
                bar.update(done)
    finally:
        for service in started:
            service.down()
    add_derived(figures)
    targets = evaluate(figures)
    print()
    print_table(
        [
            {
                "ratio": name,
                "value": f"{value:.2f}",
                "target": target,
                "met": "" if met is None else "met" if met else "NOT MET",
            }
            for name, value, target, met in targets
        ],
        ["ratio", "value", "target", "met"],
    )
    for line in summary_lines(figures):
        print(line)
    write_results(figures, targets)
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")
    return 0


def add_derived(f: dict[str, float]) -> None:
    """jobs/s one PostgreSQL core could serve at the measured server CPU per job (enqueue + drain)."""
    for kind in ("pgmq_fleet", "pgqueuer", "redis_fleet"):
        cpu = f.get(f"drain_{kind}_db_cpu_ms_per_1k")
        if cpu:
            f[f"drain_{kind}_jobs_per_s_per_db_core"] = 1_000_000 / cpu


# (what is compared, numerator, denominator, the ratio's floor; None where there is no target)
RATIOS: list[tuple[str, str, str, float | None]] = [
    ("full fleet stack on pgmq / StubBroker ceiling", "drain_pgmq_fleet_jobs_per_s", "drain_stub_jobs_per_s", 0.5),
    (
        "full fleet stack on pgmq / pgqueuer (its defaults)",
        "drain_pgmq_fleet_jobs_per_s",
        "drain_pgqueuer_jobs_per_s",
        2,
    ),
    (
        "full fleet stack on Redis / stock dramatiq + RedisBroker",
        "drain_redis_fleet_jobs_per_s",
        "drain_redis_jobs_per_s",
        0.9,
    ),
    ("PgmqBroker (default middleware) / stock RedisBroker", "drain_pgmq_jobs_per_s", "drain_redis_jobs_per_s", 2),
    ("PgmqBroker (default middleware) / StubBroker ceiling", "drain_pgmq_jobs_per_s", "drain_stub_jobs_per_s", 0.5),
    (
        "SDK bulk enqueue / raw send_batch in one transaction",
        "enqueue_sdk_jobs_per_s",
        "enqueue_raw_send_batch_one_transaction_per_s",
        0.8,
    ),
    ("8 producers: SDK enqueue / raw pgmq.send, jobs/s", "producers8_sdk_jobs_per_s", "producers8_raw_jobs_per_s", 0.8),
    ("8 producers: raw pgmq.send p50 latency / SDK p50 latency", "producers8_raw_p50_ms", "producers8_sdk_p50_ms", 0.8),
    ("8 producers: raw pgmq.send p99 latency / SDK p99 latency", "producers8_raw_p99_ms", "producers8_sdk_p99_ms", 0.8),
    (
        "embedding docs/s / the provider's measured direct rate",
        "embed_docs_per_s",
        "embed_provider_direct_docs_per_s",
        0.95,
    ),
    (
        "PostgreSQL CPU per job, fleet on pgmq / pgqueuer",
        "drain_pgmq_fleet_db_cpu_ms_per_1k",
        "drain_pgqueuer_db_cpu_ms_per_1k",
        None,
    ),
    ("chats/s / the provider's measured direct rate", "chat_per_s", "chat_provider_direct_per_s", None),
    (
        "32 producers: SDK enqueue / raw pgmq.send, jobs/s",
        "producers32_sdk_jobs_per_s",
        "producers32_raw_jobs_per_s",
        None,
    ),
    (
        "8 producers: raw pgmq.send with the NOTIFY trigger / without",
        "producers8_raw_jobs_per_s",
        "producers8_raw_nonotify_jobs_per_s",
        None,
    ),
    (
        "32 producers: raw pgmq.send with the NOTIFY trigger / without",
        "producers32_raw_jobs_per_s",
        "producers32_raw_nonotify_jobs_per_s",
        None,
    ),
    (
        "PgmqBroker (prefetch 64) / StubBroker ceiling",
        "drain_pgmq_jobs_per_s_prefetch64",
        "drain_stub_jobs_per_s",
        None,
    ),
    (
        "full fleet stack on pgmq (prefetch 64) / StubBroker ceiling",
        "drain_pgmq_fleet_jobs_per_s_prefetch64",
        "drain_stub_jobs_per_s",
        None,
    ),
    ("drain, 2 worker processes / 1", "growth_drain_2proc_jobs_per_s", "growth_drain_1proc_jobs_per_s", None),
    ("drain, 4 worker processes / 1", "growth_drain_4proc_jobs_per_s", "growth_drain_1proc_jobs_per_s", None),
    (
        "read+delete with 1M waiting / with 10k waiting",
        "growth_read_delete_1m_waiting_per_s",
        "growth_read_delete_10k_waiting_per_s",
        None,
    ),
    (
        "read+delete after draining 1M (dead rows) / with 10k waiting",
        "growth_read_delete_after_purge_per_s",
        "growth_read_delete_10k_waiting_per_s",
        None,
    ),
]


def evaluate(f: dict[str, float]) -> list[tuple[str, float, str, bool | None]]:
    """(name, ratio, target, met?) for every ratio of RATIOS, None where there is no target."""
    rows: list[tuple[str, float, str, bool | None]] = []
    for name, numerator, denominator, floor in RATIOS:
        ratio = f[numerator] / f[denominator]
        rows.append((name, ratio, "-", None) if floor is None else (name, ratio, f">= {floor:g}", ratio >= floor))
    return rows


def summary_lines(f: dict[str, float]) -> list[str]:
    lines = [
        f"idle pickup p50: {f['pickup_p50_ms']:.2f} ms (target < 15 ms: {'met' if f['pickup_p50_ms'] < 15 else 'NOT MET'}),"
        f" p99: {f['pickup_p99_ms']:.2f} ms",
        f"chat added latency p50: {f['chat_added_latency_p50_ms']:.1f} ms (target < 30 ms: "
        f"{'met' if f['chat_added_latency_p50_ms'] < 30 else 'NOT MET'}), p99: {f['chat_added_latency_p99_ms']:.1f} ms",
    ]
    for n in (8, 32):
        lines.append(
            f"{n} producers, one job per transaction: SDK {f[f'producers{n}_sdk_jobs_per_s']:,.0f} jobs/s"
            f" (p50 {f[f'producers{n}_sdk_p50_ms']:.1f} ms, p99 {f[f'producers{n}_sdk_p99_ms']:.1f} ms),"
            f" raw pgmq.send {f[f'producers{n}_raw_jobs_per_s']:,.0f}/s (p50 {f[f'producers{n}_raw_p50_ms']:.1f} ms,"
            f" p99 {f[f'producers{n}_raw_p99_ms']:.1f} ms), raw without the NOTIFY trigger"
            f" {f[f'producers{n}_raw_nonotify_jobs_per_s']:,.0f}/s"
        )
    for kind, label in (
        ("pgmq_fleet", "fleet on pgmq"),
        ("pgqueuer", "pgqueuer"),
        ("redis_fleet", "fleet on Redis (events only)"),
    ):
        cpu = f.get(f"drain_{kind}_db_cpu_ms_per_1k")
        if cpu:
            lines.append(
                f"PostgreSQL CPU per 1,000 jobs (enqueue + drain), {label}: {cpu:.0f} ms"
                f" = {f[f'drain_{kind}_jobs_per_s_per_db_core']:,.0f} jobs/s per PostgreSQL core"
            )
    for broker in ("pgmq", "redis"):
        lines.append(
            f"gateway added latency to the first delta ({broker}): p50 {f[f'gateway_{broker}_added_latency_p50_ms']:.1f} ms,"
            f" p99 {f[f'gateway_{broker}_added_latency_p99_ms']:.1f} ms; idle SSE streams held by one process:"
            f" {f[f'gateway_{broker}_idle_streams']:,.0f} (target 1,000)"
        )
    lines.append(f"upgrade fan-out: {f['upgrade_fanout_agents']:,.0f} agents in {f['upgrade_fanout_s']:.2f} s")
    lines.append(
        f"lifecycle: {f['lifecycle_rows_examined_per_s']:,.0f} memories examined/s, "
        f"{f['lifecycle_applied_per_s']:,.0f} changes applied/s on {f['lifecycle_rows']:,.0f} memories"
    )
    return lines


def profile_table(f: dict[str, float]) -> list[str]:
    """CPU µs per job by middleware, from bench.profile's run on each broker."""
    names = sorted(
        {
            k[len("profile_pgmq_") : -len("_us_per_job")]
            for k in f
            if k.startswith("profile_pgmq_") and k.endswith("_us_per_job")
        },
        key=lambda n: -f[f"profile_pgmq_{n}_us_per_job"],
    )
    lines = ["| CPU per job (µs) | pgmq | Redis |", "|---|---|---|"]
    for n in names:
        lines.append(
            f"| {n.replace('_', ' ')} | {f[f'profile_pgmq_{n}_us_per_job']:.1f} |"
            f" {f.get(f'profile_redis_{n}_us_per_job', 0):.1f} |"
        )
    return lines


def write_results(figures: dict[str, float], targets: list) -> None:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        "# Benchmark results",
        "",
        f"Measured by `make bench` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC: {os.cpu_count()} cores ({cpu}),",
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}; embedded PostgreSQL 18 and Redis on loopback.",
        "One worker process with 8 threads, no-op jobs, unless a figure says otherwise. Every figure comes from the same run as its baseline.",
        f"The drains of the peers ran in {ROUNDS} interleaved rounds of {int(DRAIN_JOBS):,} jobs each; their figures are the median round.",
        "",
        "| target | measured | target | met |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {value:.2f} | {target} | {'-' if met is None else 'met' if met else 'not met'} |"
        for name, value, target, met in targets
    ]
    lines += [
        "",
        *(f"- {line}" for line in summary_lines(figures)),
        "",
        "Where a full-stack job's CPU goes (bench/profile.py, 5,000 jobs, thread CPU time):",
        "",
        *profile_table(figures),
        "",
        "| figure | value |",
        "|---|---|",
    ]
    lines += [f"| `{k}` | {v:,.2f} |" for k, v in figures.items()]
    lines += [
        "",
        f"Memory lifecycle (expire, archive, decay) on {figures['lifecycle_rows']:,.0f} memories: "
        f"{figures['lifecycle_applied']:,.0f} changes in {figures['lifecycle_run_s']:.1f} s; the exact dry run took "
        f"{figures['lifecycle_dry_run_s']:.1f} s.",
        f"Queue table bloat: {figures['growth_table_mb_full']:.0f} MB holding 1M messages, "
        f"{figures['growth_table_mb_drained']:.0f} MB once drained (dead rows until VACUUM), "
        f"{figures['growth_table_mb_after_vacuum_full']:.1f} MB after VACUUM FULL.",
        "",
    ]
    RESULTS.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
