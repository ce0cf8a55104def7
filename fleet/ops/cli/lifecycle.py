"""The memory lifecycle: `fleet lifecycle run|undo`."""

from __future__ import annotations

import sys
import time

from fleet.ops.cli.output import print_json
from fleet.ops.queries import run_outcome


def cmd_lifecycle(args) -> int:
    from fleet.shared.client import FleetClient
    from fleet.workers.lifecycle.actions import undo_run

    if args.action == "undo":
        if not args.run:
            raise SystemExit("fleet lifecycle undo RUN_ID")
        print(f"restored {undo_run(args.run)} memory(ies)")
        return 0
    payload = {"dry_run": args.dry_run}
    if args.project:
        payload["project_id"] = args.project
    if args.actions:
        payload["actions"] = args.actions
    done = FleetClient().enqueue("memory_lifecycle", payload)
    print(f"enqueued lifecycle run (job {done.job_id}, trace {done.trace_id})", file=sys.stderr)
    if args.no_wait:
        print(f"its counts come in its lifecycle.done event: fleet events --trace {done.trace_id}", file=sys.stderr)
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if (outcome := run_outcome(done.trace_id)) is not None:
            return _show_outcome(*outcome, as_json=args.json)
        time.sleep(0.2)
    print("fleet lifecycle: no result yet (is a lifecycle worker running?)", file=sys.stderr)
    return 1


def _show_outcome(kind: str, result: dict, *, as_json: bool) -> int:
    from fleet.workers.lifecycle.actions import ACTIONS

    if kind == "job.dead":
        print(f"fleet lifecycle: the run failed: {result.get('reason')}", file=sys.stderr)
        return 1
    if as_json:
        print_json(result)
    else:
        print(f"run {result['run_id']}{' (dry run)' if result['dry_run'] else ''} in {result['duration_ms']:.0f} ms")
        for action in ACTIONS:
            print(f"  {action:<8} {result['counts'].get(action, 0)}")
        total = sum(result["counts"].values())
        print(f"{'would make' if result['dry_run'] else 'made'} {total} change(s) in all")
    return 0


def register(sub) -> None:
    s = sub.add_parser("lifecycle", help="memory lifecycle: run (or dry-run) it now, or undo a run")
    s.add_argument("action", choices=["run", "undo"])
    s.add_argument("run", nargs="?", help="with undo: the run id")
    s.add_argument("--project")
    s.add_argument("--dry-run", action="store_true")
    s.add_argument("--actions", nargs="*", help="a subset of expire archive decay evict merge reembed purge")
    s.add_argument("--no-wait", action="store_true")
    s.add_argument("--timeout", type=float, default=600)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_lifecycle)
