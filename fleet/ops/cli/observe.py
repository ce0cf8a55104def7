"""Looking at the fleet: `fleet status`, `fleet health`, `fleet events`."""

from __future__ import annotations

import json
import sys
import time

from fleet.ops.cli.output import print_json, print_table, report_cut
from fleet.ops.terminal import interactive
from fleet.shared.config import get_settings

HEALTH_COLUMNS = [
    "provider",
    "model",
    "kind",
    "status",
    "latency_ms",
    "consecutive_failures",
    "last_error_class",
    "checked_at",
]


def status_snapshot() -> dict:
    from fleet.shared.db import connections
    from fleet.shared.health import current_health
    from fleet.shared.leadership import current_leader
    from fleet.shared.status import queue_stats

    where = connections()
    return {
        "broker": get_settings().broker,
        "database": where["database"],
        "redis": where["redis"],
        "queues": queue_stats(with_recent=True),
        "scheduler_leader": current_leader(),
        "providers": current_health(),
    }


def cmd_health(args) -> int:
    from fleet.shared.health import current_health, refresh

    if args.refresh:
        refresh()
    rows = current_health()
    if args.json:
        print_json(rows)
    else:
        print_table(rows, HEALTH_COLUMNS)
    return 0


QUEUE_COLUMNS = [
    "queue",
    "depth",
    "visible",
    "in_flight",
    "oldest_age_s",
    "succeeded_1m",
    "retried_1m",
    "failed_1m",
    "dead_letters",
]


def cmd_status(args) -> int:
    while True:
        snap = status_snapshot()
        if args.json:
            print_json(snap)
        else:
            if args.watch and interactive():
                print("\033[2J\033[H", end="")
            _show_status(snap)
        if not args.watch:
            return 0
        time.sleep(args.watch)


def _show_status(snap: dict) -> None:
    print(f"database: {snap['database']}" + (f"    redis: {snap['redis']}" if snap["redis"] else ""))
    print(f"broker: {snap['broker']}    scheduler leader: {snap['scheduler_leader'] or 'none'}")
    print_table(snap["queues"], QUEUE_COLUMNS)
    print()
    if snap["providers"]:
        print_table(snap["providers"], HEALTH_COLUMNS, title="provider health:")
    else:
        print("provider health: no probe yet (the scheduler runs them; or `fleet health --refresh`)")


def cmd_events(args) -> int:
    from fleet.ops.queries import job_events

    if not (args.trace or args.job):
        print("fleet events: give --trace or --job", file=sys.stderr)
        return 2
    rows = job_events(trace_id=args.trace, job_id=args.job, limit=args.limit + 1)
    cut = len(rows) > args.limit
    del rows[args.limit :]
    if args.json:
        print_json(rows)
    else:
        for r in rows:
            print(
                f"{r['created_at']:%Y-%m-%d %H:%M:%S.%f}  {r['type']:<16} {r['queue'] or '':<12} {r['job_id'] or ''}"
                f"  {json.dumps(r['payload'])}"
            )
    if cut:
        report_cut("fleet events", args.limit, None, "events")
    return 0


def register(sub) -> None:
    s = sub.add_parser("status", help="per queue: depth, oldest age, in flight, recent outcomes, dead letters")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, help="refresh every N seconds")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("health", help="provider health (the last probes); --refresh probes now")
    s.add_argument("--refresh", action="store_true", help="probe every provider now, then show the result")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_health)

    s = sub.add_parser("events", help="a job's whole story from bus_events")
    s.add_argument("--trace", help="a trace id: every job of the trace")
    s.add_argument("--job", help="a job id")
    s.add_argument("--limit", type=int, default=1000, help="show at most N events (default 1000); a cut is reported")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_events)
