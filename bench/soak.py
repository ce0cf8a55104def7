"""Chaos soak: a mixed workload of every job family through real worker processes while a chaos driver
stops a random worker group every few seconds (SIGKILL, and every third time a graceful SIGTERM)
and starts a new one, restarts PostgreSQL once in immediate mode (a crash: unflushed commits are
lost), and on the Redis broker restarts Redis once; a
`fleet scheduler` runs throughout, as in production. Then it reads the outcome from the database.

    python -m bench.soak [--broker pgmq|redis|both] [--jobs 10000] [--faults] [--time-limit 900]

It starts its own PostgreSQL (and Redis) under a temporary FLEET_HOME and the provider simulator, and
stops all of them, by PID, when it ends. Prints a JSON report per broker; exits 1 when a job was lost,
an effect was applied twice, a dead letter has no reason, or the run did not settle in time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.isolation import isolated_home
from bench.soak_checks import SECRET_KEY, Outcome, soak_report

# The provider fault storm (--faults): 30% 5xx, 10% 429 with Retry-After, 5% timeouts, 5% malformed bodies.
STORM = {
    "error_rate_5xx": 0.30,
    "rate_429": 0.10,
    "retry_after_s": 1.0,
    "timeout_rate": 0.05,
    "timeout_s": 3.0,
    "malformed_rate": 0.05,
}
CALM = {
    "latency_ms": 5,
    "latency_per_input_ms": 0.2,
    "ttft_ms": 20,
    "tokens_per_s": 0,
    "answer_tokens": 8,
    "letta_latency_ms": 5,
}
GROUPS = 3  # worker groups (a dramatiq main process with one worker process each), all queues


@dataclass
class Mix:
    """How many jobs of each family, for a total of about `jobs`."""

    jobs: int
    echo: int = field(init=False)
    embed_jobs: int = field(init=False)
    chats: int = field(init=False)
    agents: int = field(init=False)
    health: int = field(init=False)
    lifecycle: int = field(init=False)

    def __post_init__(self) -> None:
        self.embed_jobs = max(2, self.jobs // 10)  # 4 documents each
        self.chats = max(2, self.jobs // 10)
        self.agents = max(2, self.jobs // 40)  # each also gets an upgrade job: 2 jobs per agent
        self.health = max(1, self.jobs // 200)
        self.lifecycle = max(1, self.jobs // 200)
        self.echo = max(10, self.jobs - self.embed_jobs - self.chats - 2 * self.agents - self.health - self.lifecycle)


class Chaos(threading.Thread):
    """Every few seconds: stop a random worker group (SIGKILL, and every third time SIGTERM) and start a
    new one. Once: restart PostgreSQL;
    once (Redis broker): restart Redis. Dead groups (a restart during an outage) are started again."""

    def __init__(
        self, start_group, groups: list, *, every_s: float, pg, redis, pg_at: float, redis_at: float, seed: int
    ) -> None:
        super().__init__(daemon=True)
        self.start_group, self.groups = start_group, groups
        self.every_s, self.pg, self.redis, self.pg_at, self.redis_at = every_s, pg, redis, pg_at, redis_at
        self.rng = random.Random(seed)
        self.stopping = threading.Event()
        self.kills = self.deaths = self.pg_restarts = self.redis_restarts = 0
        self.errors: list[str] = []
        self.sigterm_stop_s: list[float] = []  # how long each graceful stop took
        self.stopped_at: list[float] = []  # when each stop (kill or SIGTERM) began, seconds from the start

    def run(self) -> None:
        t0 = time.monotonic()
        next_kill = t0 + self.every_s
        while not self.stopping.wait(0.2):
            now = time.monotonic()
            try:
                if self.pg_at and now - t0 >= self.pg_at and not self.pg_restarts:
                    self.pg.down(mode="immediate")  # a crash: what was not flushed to the WAL is lost
                    time.sleep(1.0)
                    self.pg.up()
                    self.pg_restarts += 1
                if self.redis and self.redis_at and now - t0 >= self.redis_at and not self.redis_restarts:
                    self.redis.down()
                    time.sleep(1.0)
                    self.redis.up()
                    self.redis_restarts += 1
                for i, group in enumerate(self.groups):
                    if not group.alive():  # died by itself (or failed to boot during an outage)
                        self.deaths += 1
                        self.groups[i] = self.start_group()
                if now >= next_kill:
                    i = self.rng.randrange(len(self.groups))
                    self.stopped_at.append(now - t0)
                    if (self.kills + len(self.sigterm_stop_s)) % 3 == 2:  # every third: a graceful stop
                        stop_started = time.monotonic()
                        self.groups[i].terminate(60)
                        self.sigterm_stop_s.append(time.monotonic() - stop_started)
                    else:
                        self.groups[i].kill()
                        self.kills += 1
                    self.groups[i] = self.start_group()
                    next_kill = time.monotonic() + self.every_s * self.rng.uniform(0.5, 1.5)
            except Exception as e:  # a start during an outage: recorded, retried on the next tick
                self.errors.append(f"{type(e).__name__}: {str(e)[:200]}")


def start_simulator(faults: bool):
    from fleet.ops.processes import start_simulator as start

    return start({**CALM, **(STORM if faults else {}), "api_key": SECRET_KEY})


def start_scheduler(env: dict, logs: Path) -> subprocess.Popen:
    with open(logs / "scheduler.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "fleet.ops.cli", "scheduler"],
            env=env,
            start_new_session=True,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent,
        )


def soak_env(sim_url: str) -> dict:
    """The workers' environment: the simulator for every provider, short timeouts so that the chaos shows."""
    return dict(os.environ) | {
        "EMBEDDING_API_BASE": f"{sim_url}/v1",
        "EMBEDDING_API_KEY": SECRET_KEY,
        "CHAT_API_BASE": f"{sim_url}/v1",
        "CHAT_API_KEY": SECRET_KEY,
        "LETTA_API_BASE_URL": sim_url,
        "LETTA_API_KEY": SECRET_KEY,
        "ZUPLO_BASE_URL": "https://billing.soak.invalid",
        "HEALTH_PROVIDERS": "chat,embedding,letta",
        "FLEET_VISIBILITY_TIMEOUT_S": "5",
        "FLEET_MAX_RETRIES": "8",
        "FLEET_MIN_BACKOFF_MS": "200",
        "FLEET_MAX_BACKOFF_MS": "4000",
        "FLEET_REDIS_MAINTENANCE_CHANCE": "1000000",
        "FLEET_LOG_LEVEL": "INFO",
        "UPGRADE_STALE_AFTER_S": "10",
        "UPGRADE_HALT_MIN_SAMPLE": "100000",
        "EMBED_PROVIDER_MAX_RETRIES": "1",
        "LETTA_MAX_RETRIES": "1",
    }


def produce_waves(work, mix: Mix, waves: int = 5) -> None:
    """The agents first, then the rest of the work in waves, a second apart."""
    work.agents(mix.agents)
    for w in range(waves):
        share = lambda n: n // waves + (1 if w < n % waves else 0)  # noqa: E731
        produce(lambda: work.echo(share(mix.echo)))
        produce(lambda: work.embeddings(4 * share(mix.embed_jobs), docs_per_job=4))
        produce(lambda: work.chats(share(mix.chats)))
        produce(lambda: work.health(share(mix.health)))
        produce(lambda: work.lifecycle(share(mix.lifecycle), memories_per_project=20))
        time.sleep(1.0)


def wait_to_settle(work, chaos: Chaos, mix: Mix, broker: str, t0: float, deadline: float, min_stops: int) -> bool:
    """Start the upgrade once the agents exist, then wait until every job is final and the chaos has done its
    part (or the deadline). Returns whether the upgrade was started."""
    upgrade_started = False
    last = 0.0
    while time.monotonic() < deadline:
        try:
            if not upgrade_started and work.agents_created() >= mix.agents:
                work.upgrade()
                upgrade_started = True
            restarts_done = (
                chaos.pg_restarts >= bool(chaos.pg_at)
                and chaos.redis_restarts >= bool(chaos.redis_at)
                and len(chaos.stopped_at) >= min_stops
            )
            if upgrade_started and restarts_done and work.settled():
                break
            if time.monotonic() - last > 5:
                done, total = work.progress()
                print(
                    f"  [{broker}] {time.monotonic() - t0:5.0f}s  {done}/{total} final, kills {chaos.kills},"
                    f" pg restarts {chaos.pg_restarts}, redis restarts {chaos.redis_restarts}",
                    flush=True,
                )
                last = time.monotonic()
        except Exception as e:  # the database is restarting: read again shortly
            print(f"  [{broker}] waiting: {type(e).__name__}", flush=True)
        time.sleep(0.5)
    return upgrade_started


def soak(
    broker: str,
    jobs: int,
    *,
    faults: bool,
    time_limit_s: float,
    kill_every_s: float,
    seed: int,
    chaos_on: bool = True,
    min_stops: int = 0,
) -> dict:
    with isolated_home(broker, "soak") as home:
        return _soak(home, broker, jobs, faults, time_limit_s, kill_every_s, seed, chaos_on, min_stops)


def _soak(
    home: Path,
    broker: str,
    jobs: int,
    faults: bool,
    time_limit_s: float,
    kill_every_s: float,
    seed: int,
    chaos_on: bool,
    min_stops: int,
) -> dict:
    from fleet.ops.processes import WorkerGroup, stop_process
    from fleet.shared.config import reset_settings
    from fleet.shared.db import close_pool, connect
    from fleet.shared.migrate import migrate
    from fleet.shared.services import EmbeddedPostgres, EmbeddedRedis

    pg, rd = EmbeddedPostgres(home), (EmbeddedRedis(home) if broker == "redis" else None)
    simulator = scheduler = None
    groups: list = []
    chaos = None
    try:
        os.environ["DATABASE_URL"] = pg.up()
        os.environ["FLEET_DB_POOLER"] = "false"
        if rd:
            os.environ["REDIS_URL"] = rd.up()
        reset_settings()
        with connect() as conn:
            migrate(conn)
        simulator, sim_url = start_simulator(faults)
        env = soak_env(sim_url)
        logs = home / "logs"
        logs.mkdir()

        def start_group():
            return WorkerGroup(env, processes=1, threads=8, metrics=True, log_dir=logs).start()

        groups = [start_group() for _ in range(GROUPS)]
        # As in production, a scheduler re-probes the providers, so jobs deferred by a probe that found one down
        # run again once it answers, and stale upgrade agents are requeued; the chaos leaves it running.
        scheduler = start_scheduler(env | {"HEALTH_REFRESH_INTERVAL_S": "5"}, logs)
        from fleet.shared.client import FleetClient
        from tests.workload import Workload

        client = FleetClient()
        work = Workload(client, connect, seed=seed)
        mix = Mix(jobs)
        t0 = time.monotonic()
        every_s = kill_every_s if chaos_on else float("inf")
        pg_at, redis_at = (2.5 if chaos_on else 0), (5.0 if (rd and chaos_on) else 0)
        chaos = Chaos(start_group, groups, every_s=every_s, pg=pg, redis=rd, seed=seed, pg_at=pg_at, redis_at=redis_at)
        chaos.start()
        # The work arrives in waves while the chaos runs; producers retry through the restarts.
        produce_waves(work, mix)
        enqueued_s = time.monotonic() - t0
        upgrade_started = wait_to_settle(work, chaos, mix, broker, t0, t0 + time_limit_s, min_stops)
        settled = upgrade_started and work.settled()
        settle_s = time.monotonic() - t0
        chaos.stopping.set()
        chaos.join()
        outcome = Outcome(broker, faults, chaos_on, settled, enqueued_s, settle_s, time_limit_s)
        return soak_report(work, chaos, outcome, scheduler, home, logs, sim_url, env)
    finally:
        if chaos:
            chaos.stopping.set()
            chaos.join()
        for g in chaos.groups if chaos else groups:
            g.terminate(30)
        for proc in (scheduler, simulator):
            if proc is not None:
                stop_process(proc, 5)
        close_pool()
        if rd:
            rd.down()
        pg.down()


def produce(enqueue, attempts: int = 60) -> None:
    """Enqueue, retrying while the database or Redis restarts (a producer that gives up loses work)."""
    for attempt in range(attempts):
        try:
            return enqueue()
        except Exception as e:
            if attempt == attempts - 1:
                raise
            print(f"  enqueue retried: {type(e).__name__}", flush=True)
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--broker", choices=["pgmq", "redis", "both"], default="both")
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--faults", action="store_true", help="the provider fault storm")
    p.add_argument("--time-limit", type=float, default=900, help="seconds before the run counts as not settled")
    p.add_argument("--kill-every", type=float, default=4.0, help="seconds between SIGKILLs (randomised 0.5x-1.5x)")
    p.add_argument(
        "--min-stops",
        type=int,
        default=0,
        help="go on until the chaos has stopped this many worker groups (a short run may settle first)",
    )
    p.add_argument("--no-chaos", action="store_true", help="no kills or restarts (with --faults: the fault storm)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--json", type=Path, help="also write the reports to this file")
    args = p.parse_args(argv)
    # Stopped from outside (a CI timeout, Ctrl-C): unwind, so the workers and services are stopped by PID.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    reports = []
    for broker in ["pgmq", "redis"] if args.broker == "both" else [args.broker]:
        print(
            f"soak on {broker}: {args.jobs} jobs, SIGKILL every ~{args.kill_every}s, faults {args.faults}", flush=True
        )
        report = soak(
            broker,
            args.jobs,
            faults=args.faults,
            time_limit_s=args.time_limit,
            kill_every_s=args.kill_every,
            seed=args.seed,
            chaos_on=not args.no_chaos,
            min_stops=args.min_stops,
        )
        reports.append(report)
        print(json.dumps(report, indent=2, default=str), flush=True)
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2, default=str))
    failed = [r for r in reports if r["problems"]]
    for r in failed:
        print(f"soak on {r['broker']} FAILED: " + "; ".join(r["problems"]), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
