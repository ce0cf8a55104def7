"""Where a full-stack job's time goes: CPU µs per job spent in each middleware's hooks, and the rest.

    python -m bench.profile --broker pgmq|redis --jobs N [--cprofile FILE]

Every hook of every middleware is wrapped with a timer of the calling thread's CPU time
(`time.thread_time_ns`: waiting on the GIL, a lock or the network is not counted), so the figures add
up to what each part costs the process per job. The process's own CPU per job (all threads) is printed
too: the difference is dramatiq's worker, the broker's consumer and the event writer.
With --cprofile, every thread runs under cProfile and the merged profile is written to FILE.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import os
import pstats
import sys
import threading
import time
from collections import defaultdict

import dramatiq
from dramatiq import Worker
from dramatiq.middleware import Middleware

from bench.drain import QUEUE, THREADS, make_broker

HOOK_PREFIXES = ("before_", "after_")


class HookTimes:
    def __init__(self) -> None:
        self.ns: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()

    def wrap(self, name: str, hook):
        @functools.wraps(hook)
        def timed(*args, **kwargs):
            t = time.thread_time_ns()
            try:
                return hook(*args, **kwargs)
            finally:
                spent = time.thread_time_ns() - t
                with self.lock:
                    self.ns[name] += spent

        return timed

    def instrument(self, broker: dramatiq.Broker) -> None:
        """Replace each implemented hook on each middleware instance by its timed version."""
        for middleware in broker.middleware:
            for attr in dir(type(middleware)):
                if not attr.startswith(HOOK_PREFIXES):
                    continue
                if getattr(type(middleware), attr) is getattr(Middleware, attr, None):
                    continue  # the base class's no-op
                setattr(middleware, attr, self.wrap(type(middleware).__name__, getattr(middleware, attr)))
        if hasattr(broker, "_hooks"):
            broker._hooks = {}  # PgmqBroker caches the implementing middleware per signal


def profile_threads(profiles: list[cProfile.Profile]) -> None:
    """Run every thread started from now on under its own cProfile (merged at the end). dramatiq's threads
    override run(), so the profiler is switched on by the first profiling event of each new thread."""

    def start(*_):
        sys.setprofile(None)
        profile = cProfile.Profile(time.thread_time)  # CPU, not time spent waiting
        profiles.append(profile)
        profile.enable()

    threading.setprofile(start)


def drain(kind: str, jobs: int, cprofile_to: str | None, bare: bool = False) -> None:
    from fleet.shared.config import get_settings
    from fleet.shared.logs import configure_logging

    configure_logging(get_settings().log_level)  # what a worker runs at (INFO by default)
    profiles: list[cProfile.Profile] = []
    if cprofile_to:
        profile_threads(profiles)
    broker = make_broker(kind if bare else f"{kind}-fleet")
    dramatiq.set_broker(broker)
    done = threading.Semaphore(0)

    @dramatiq.actor(queue_name=QUEUE, actor_name="noop", max_retries=0)
    def noop(payload=None):
        done.release()

    for start in range(0, jobs, 1000):
        broker.enqueue_many([noop.message({"i": i}) for i in range(start, min(jobs, start + 1000))]) if hasattr(
            broker, "enqueue_many"
        ) else [broker.enqueue(noop.message({"i": i})) for i in range(start, min(jobs, start + 1000))]
    times = HookTimes()
    times.instrument(broker)
    worker = Worker(broker, queues={QUEUE}, worker_threads=THREADS, worker_timeout=100)
    cpu, wall = time.process_time(), time.perf_counter()
    worker.start()
    for _ in range(jobs):
        if not done.acquire(timeout=120):
            raise SystemExit("profile: the drain stalled")
    worker.stop()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    broker.close()
    report(kind, jobs, times, cpu, wall)
    if cprofile_to:
        for profile in profiles:
            profile.disable()  # a stopped thread's profiler holds what it saw
        stats = pstats.Stats(*profiles) if profiles else None
        if stats is not None:
            stats.dump_stats(cprofile_to)
            stats.sort_stats("tottime").print_stats(25)


def report(kind: str, jobs: int, times: HookTimes, cpu_s: float, wall_s: float) -> None:
    total_us = cpu_s * 1e6 / jobs
    hooks_us = sum(times.ns.values()) / 1000 / jobs
    print(f"profile_{kind}_jobs_per_s: {jobs / wall_s:.0f}")
    print(f"profile_{kind}_process_cpu_us_per_job: {total_us:.1f}")
    for name, ns in sorted(times.ns.items(), key=lambda kv: -kv[1]):
        print(f"profile_{kind}_{name}_us_per_job: {ns / 1000 / jobs:.1f}")
    print(f"profile_{kind}_outside_middleware_us_per_job: {total_us - hooks_us:.1f}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--broker", choices=["pgmq", "redis", "stub"], default="pgmq")
    p.add_argument("--bare", action="store_true", help="the library's broker and dramatiq's default middleware")
    p.add_argument("--jobs", type=int, default=20000)
    p.add_argument("--cprofile", default=None, help="write the merged per-thread cProfile here")
    a = p.parse_args()
    os.environ.setdefault("FLEET_LOG_LEVEL", "INFO")
    drain(a.broker, a.jobs, a.cprofile, a.bare or a.broker == "stub")


if __name__ == "__main__":
    main()
