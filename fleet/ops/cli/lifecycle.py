"""The memory lifecycle: `fleet lifecycle run|undo`."""

from __future__ import annotations

import sys
import time

from fleet.ops.cli.output import print_json
from fleet.ops.queries import run_outcome


def cmd_undo(args) -> int:
    from fleet.workers.lifecycle.actions import undo_run

    print(f"restored {undo_run(args.run)} memory(ies)")
    return 0


def cmd_run(args) -> int:
    from fleet.shared.client import FleetClient

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
    s = sub.add_parser(
        "lifecycle",
        help="memory lifecycle: run (or dry-run) it now, or undo a run",
        description="The memory lifecycle (expire, archive, decay, evict, merge, reembed, purge), run"
        " by a lifecycle worker; the scheduler runs it every LIFECYCLE_INTERVAL_S.",
    )
    actions = s.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("run", help="run it now and print how many memories each action changed")
    p.add_argument("--project", help="only this project's memories (default: every project)")
    p.add_argument("--dry-run", action="store_true", help="count what each action would change, and change nothing")
    p.add_argument(
        "--actions",
        nargs="*",
        metavar="ACTION",
        help="a subset of expire archive decay evict merge reembed purge (default: all, in that order)",
    )
    p.add_argument("--no-wait", action="store_true", help="enqueue the run and return without its counts")
    p.add_argument("--timeout", type=float, default=600, help="wait at most N seconds for the run's result")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_run)
    p = actions.add_parser("undo", help="put back every memory a run changed")
    p.add_argument("run", metavar="RUN_ID", help="the run's id (fleet lifecycle run prints it)")
    p.set_defaults(func=cmd_undo)
